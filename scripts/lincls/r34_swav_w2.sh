#!/usr/bin/env bash
# ResNet-34 distilled from SwAV R-50w2. Paper (ImageNet linear): 68.9 / 89.0.
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet34 swav_w2 "$@"
