#!/usr/bin/env bash
# ResNet-34 distilled from MoCo v2 R-50 200 ep. Paper (ImageNet linear): 63.5 / 85.7.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet34 moco200 "$@"
