#!/usr/bin/env bash
# MobileNet-v3-large distilled from SwAV R-50w2 (SPEC gives no probe lr: EfficientNet-B0's). Paper (ImageNet linear): 67.1 top-1.
exec bash "$(dirname "$0")/evaluate.sh" bingo mobilenet_v3_large swav_w2 --lr=3.0 --min_lr=0.001 "$@"
