#!/usr/bin/env bash
# ResNet-34 distilled from MoCo v2 R-50 800 ep. Paper (ImageNet linear): 66.1 / 87.2.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet34 moco800 "$@"
