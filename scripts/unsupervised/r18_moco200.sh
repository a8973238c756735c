#!/usr/bin/env bash
# resnet18 student from MoCo v2 R-50, 200 ep (SPEC table: 61.4 / 84.3).
set -euo pipefail
export ARCH=resnet18 RUN=${RUN:-runs/r18_moco200}
export TEACHER=${TEACHER:-checkpoints/moco_v2_200ep_pretrain.pth.tar} TEACHER_ARCH=resnet50
export NEIGHBOURS=${NEIGHBOURS:-bags/moco_v2_200ep_k5.npy}   # from run_knn.sh with this teacher
exec bash "$(dirname "$0")/distill.sh" "$@"
