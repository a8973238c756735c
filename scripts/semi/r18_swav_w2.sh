#!/usr/bin/env bash
# ResNet-18 distilled from SwAV R-50w2. Paper (fine-tuned, top-1): 48.2 (1 %) / 60.2 (10 %).
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet18 swav_w2 "$@"
