#!/usr/bin/env bash
# SEED: resnet34 student from SwAV R-50w2 (no ResNet-34 number found). Recipe and sources: docs/peers.md.
# SEED's release crops from 0.14 of the image when the teacher is SwAV (tools/utils.py, swav_aug).
exec bash "$(dirname "$0")/distill.sh" seed resnet34 swav_w2 --crop_min_scale=0.14 "$@"
