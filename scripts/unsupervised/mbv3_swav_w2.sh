#!/usr/bin/env bash
# mobilenet_v3_large student from SwAV R-50w2 (SPEC table: 67.1 top-1).
# SPEC gives no MobileNet settings: the EfficientNet-B0 ones.
exec bash "$(dirname "$0")/distill.sh" bingo mobilenet_v3_large swav_w2 --temperature=0.12 --weight_decay=4e-5 "$@"
