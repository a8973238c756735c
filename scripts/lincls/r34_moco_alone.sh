#!/usr/bin/env bash
# ResNet-34 trained by MoCo v2 alone (no teacher). Paper (ImageNet linear): 57.4 / 81.6.
export ARCH=resnet34 RUN=${RUN:-runs/r34_moco_alone}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
