#!/usr/bin/env bash
# resnet34 student from MoCo v2 R-50, 200 ep (SPEC table: 63.5 / 85.7).
set -euo pipefail
export ARCH=resnet34 RUN=${RUN:-runs/r34_moco200}
export TEACHER=${TEACHER:-checkpoints/moco_v2_200ep_pretrain.pth.tar} TEACHER_ARCH=resnet50
export NEIGHBOURS=${NEIGHBOURS:-bags/moco_v2_200ep_k5.npy}   # from run_knn.sh with this teacher
exec bash "$(dirname "$0")/distill.sh" "$@"
