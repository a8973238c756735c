#!/usr/bin/env bash
# resnet18 student from MoCo v2 R-50, 800 ep (SPEC table: 64.0 / 85.7).
set -euo pipefail
export ARCH=resnet18 RUN=${RUN:-runs/r18_moco800}
export TEACHER=${TEACHER:-checkpoints/moco_v2_800ep_pretrain.pth.tar} TEACHER_ARCH=resnet50
export NEIGHBOURS=${NEIGHBOURS:-bags/moco_v2_800ep_k5.npy}   # from run_knn.sh with this teacher
exec bash "$(dirname "$0")/distill.sh" "$@"
