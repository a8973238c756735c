#!/usr/bin/env bash
# ResNet-18 distilled from MoCo v2 R-152. Paper (ImageNet linear): 65.9 / 87.1.
export ARCH=resnet18 RUN=${RUN:-runs/r18_r152}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
