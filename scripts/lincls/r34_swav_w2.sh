#!/usr/bin/env bash
# ResNet-34 distilled from SwAV R-50w2. Paper (ImageNet linear): 68.9 / 89.0.
export ARCH=resnet34 RUN=${RUN:-runs/r34_swav_w2}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
