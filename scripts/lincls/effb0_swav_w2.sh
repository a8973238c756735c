#!/usr/bin/env bash
# EfficientNet-B0 distilled from SwAV R-50w2 (probe lr 3.0 as released). Paper (ImageNet linear): 69.3 top-1.
exec bash "$(dirname "$0")/evaluate.sh" bingo efficientnet_b0 swav_w2 --lr=3.0 --min_lr=0.001 "$@"
