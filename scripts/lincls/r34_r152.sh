#!/usr/bin/env bash
# ResNet-34 distilled from MoCo v2 R-152. Paper (ImageNet linear): 69.1 / 88.9.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet34 r152 "$@"
