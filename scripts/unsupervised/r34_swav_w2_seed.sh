#!/usr/bin/env bash
# SEED: resnet34 student from SwAV R-50w2 (no ResNet-34 number found). Recipe and sources: docs/peers.md.
set -euo pipefail
export METHOD=seed ARCH=resnet34 RUN=${RUN:-runs/r34_swav_w2_seed}
export TEACHER=${TEACHER:-checkpoints/swav_RN50w2_400ep_pretrain.pth.tar} TEACHER_ARCH=resnet50w2
# SEED's release crops from 0.14 of the image when the teacher is SwAV (tools/utils.py, swav_aug).
exec bash "$(dirname "$0")/distill.sh" --crop_min_scale=0.14 "$@"
