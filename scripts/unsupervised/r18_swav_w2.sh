#!/usr/bin/env bash
# resnet18 student from SwAV R-50w2 (SPEC table: 65.5 / 87.0).
set -euo pipefail
export ARCH=resnet18 RUN=${RUN:-runs/r18_swav_w2}
export TEACHER=${TEACHER:-checkpoints/swav_RN50w2_400ep_pretrain.pth.tar} TEACHER_ARCH=resnet50w2
export NEIGHBOURS=${NEIGHBOURS:-bags/swav_w2_k5.npy}   # from run_knn.sh with this teacher
exec bash "$(dirname "$0")/distill.sh" "$@"
