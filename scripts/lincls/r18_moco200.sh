#!/usr/bin/env bash
# ResNet-18 distilled from MoCo v2 R-50 200 ep. Paper (ImageNet linear): 61.4 / 84.3.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet18 moco200 "$@"
