#!/usr/bin/env bash
# SEED: resnet18 student from SwAV R-50w2 (SPEC, peers: 63.0 top-1). Recipe and sources: docs/peers.md.
# SEED's release crops from 0.14 of the image when the teacher is SwAV (tools/utils.py, swav_aug).
exec bash "$(dirname "$0")/distill.sh" seed resnet18 swav_w2 --crop_min_scale=0.14 "$@"
