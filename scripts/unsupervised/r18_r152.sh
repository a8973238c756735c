#!/usr/bin/env bash
# resnet18 student from MoCo v2 R-152 (SPEC table: 65.9 / 87.1).
set -euo pipefail
export ARCH=resnet18 RUN=${RUN:-runs/r18_r152}
export TEACHER=${TEACHER:-checkpoints/moco_v2_r152.pth.tar} TEACHER_ARCH=resnet152
export NEIGHBOURS=${NEIGHBOURS:-bags/moco_v2_r152_k5.npy}   # from run_knn.sh with this teacher
exec bash "$(dirname "$0")/distill.sh" "$@"
