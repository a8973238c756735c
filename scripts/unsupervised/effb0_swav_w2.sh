#!/usr/bin/env bash
# efficientnet_b0 student from SwAV R-50w2 (SPEC table: 69.3 top-1).
# The released EfficientNet-B0 settings: T 0.12, weight decay 4e-5.
exec bash "$(dirname "$0")/distill.sh" bingo efficientnet_b0 swav_w2 --temperature=0.12 --weight_decay=4e-5 "$@"
