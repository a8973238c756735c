#!/usr/bin/env bash
# ResNet-18 distilled from SwAV R-50w2. Paper (ImageNet linear): 65.5 / 87.0.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet18 swav_w2 "$@"
