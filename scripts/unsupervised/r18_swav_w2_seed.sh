#!/usr/bin/env bash
# SEED: resnet18 student from SwAV R-50w2 (SPEC, peers: 63.0 top-1). Recipe and sources: docs/peers.md.
set -euo pipefail
export METHOD=seed ARCH=resnet18 RUN=${RUN:-runs/r18_swav_w2_seed}
export TEACHER=${TEACHER:-checkpoints/swav_RN50w2_400ep_pretrain.pth.tar} TEACHER_ARCH=resnet50w2
# SEED's release crops from 0.14 of the image when the teacher is SwAV (tools/utils.py, swav_aug).
exec bash "$(dirname "$0")/distill.sh" --crop_min_scale=0.14 "$@"
