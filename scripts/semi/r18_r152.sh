#!/usr/bin/env bash
# ResNet-18 distilled from R-152. Paper (fine-tuned, top-1): 50.3 (1 %) / 61.2 (10 %).
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet18 r152 "$@"
