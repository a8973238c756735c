#!/usr/bin/env bash
# EfficientNet-B0 distilled from SwAV R-50w2 (probe lr 3.0 as released). Paper (ImageNet linear): 69.3 top-1.
export ARCH=efficientnet_b0 RUN=${RUN:-runs/effb0_swav_w2}
exec bash "$(dirname "$0")/evaluate.sh" --lr=3.0 --min_lr=0.001 "$@"
