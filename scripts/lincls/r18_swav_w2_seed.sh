#!/usr/bin/env bash
# ResNet-18 distilled by SEED from SwAV R-50w2. Paper (ImageNet linear, SPEC's peers): 63.0.
export ARCH=resnet18 RUN=${RUN:-runs/r18_swav_w2_seed}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
