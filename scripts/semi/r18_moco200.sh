#!/usr/bin/env bash
# ResNet-18 distilled from MoCo v2 R-50 200 ep. Paper (fine-tuned, top-1): 42.8 (1 %) / 57.5 (10 %).
exec bash "$(dirname "$0")/evaluate.sh" bingo resnet18 moco200 "$@"
