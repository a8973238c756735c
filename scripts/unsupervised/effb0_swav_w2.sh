#!/usr/bin/env bash
# efficientnet_b0 student from SwAV R-50w2 (SPEC table: 69.3 top-1).
set -euo pipefail
export ARCH=efficientnet_b0 RUN=${RUN:-runs/effb0_swav_w2}
export TEACHER=${TEACHER:-checkpoints/swav_RN50w2_400ep_pretrain.pth.tar} TEACHER_ARCH=resnet50w2
export NEIGHBOURS=${NEIGHBOURS:-bags/swav_w2_k5.npy}   # from run_knn.sh with this teacher
export T=0.12 WD=4e-5  # released EfficientNet-B0 settings
exec bash "$(dirname "$0")/distill.sh" "$@"
