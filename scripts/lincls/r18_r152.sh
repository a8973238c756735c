#!/usr/bin/env bash
# ResNet-18 distilled from MoCo v2 R-152. Paper (ImageNet linear): 65.9 / 87.1.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet18 r152 "$@"
