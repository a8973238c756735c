#!/usr/bin/env bash
# ResNet-18 distilled from SwAV R-50w2. Paper (ImageNet linear): 65.5 / 87.0.
export ARCH=resnet18 RUN=${RUN:-runs/r18_swav_w2}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
