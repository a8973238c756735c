#!/usr/bin/env bash
# ResNet-34 distilled from MoCo v2 R-152. Paper (ImageNet linear): 69.1 / 88.9.
export ARCH=resnet34 RUN=${RUN:-runs/r34_r152}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
