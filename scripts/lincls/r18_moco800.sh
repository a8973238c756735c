#!/usr/bin/env bash
# ResNet-18 distilled from MoCo v2 R-50 800 ep. Paper (ImageNet linear): 64.0 / 85.7.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet18 moco800 "$@"
