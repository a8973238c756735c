#!/usr/bin/env bash
# mobilenet_v3_large student from SwAV R-50w2 (SPEC table: 67.1 top-1).
set -euo pipefail
export ARCH=mobilenet_v3_large RUN=${RUN:-runs/mbv3_swav_w2}
export TEACHER=${TEACHER:-checkpoints/swav_RN50w2_400ep_pretrain.pth.tar} TEACHER_ARCH=resnet50w2
export NEIGHBOURS=${NEIGHBOURS:-bags/swav_w2_k5.npy}   # from run_knn.sh with this teacher
export T=0.12 WD=4e-5  # SPEC gives no MobileNet settings: the EfficientNet-B0 ones
exec bash "$(dirname "$0")/distill.sh" "$@"
