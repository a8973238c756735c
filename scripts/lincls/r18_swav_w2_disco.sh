#!/usr/bin/env bash
# ResNet-18 distilled by DisCo from SwAV R-50w2. Paper (ImageNet linear, SPEC's peers): 65.2.
export ARCH=resnet18 RUN=${RUN:-runs/r18_swav_w2_disco}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
