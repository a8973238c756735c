#!/usr/bin/env bash
# Stage 1: embed every training image with the frozen teacher and write its k nearest neighbours
# (the bags) to an (N, k) .npy with a .json sidecar. Name teachers of scripts/teachers.sh to write
# the bag files the row scripts read, or set the variables for any other teacher:
#   bash run_knn.sh swav_w2                          # bags/swav_w2_k5.npy
#   bash run_knn.sh moco200 moco800 r152 swav_w2     # every bag file of scripts/unsupervised/
#   TEACHER=checkpoints/swav_RN50w2_400ep_pretrain.pth.tar TEACHER_ARCH=resnet50w2 \
#   OUTPUT=bags/swav_w2_k5.npy bash run_knn.sh
# Arguments starting with -- are flags of knn_extract.py, passed to every run.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/teachers.sh
DATA=${DATA:-/datasets/imagenet}                                  # ImageFolder root with train/
TEACHER_FORMAT=${TEACHER_FORMAT:-auto}                             # auto|moco|swav|torchvision|bingo
K=${K:-5}                                                          # clus_pos_num
GPUS=${GPUS:-8}
BATCH=${BATCH:-$((256 * GPUS * ${NNODES:-1}))}                      # global batch (256 per GPU)
WORKERS=${WORKERS:-8}
BACKEND=${BACKEND:-auto}                                           # auto|faiss|torch
names=() flags=()
for arg in "$@"; do
  case $arg in
    --*) flags+=("$arg") ;;
    *) names+=("$arg") ;;
  esac
done

extract() {  # checkpoint backbone output
  torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$GPUS" knn_extract.py \
    --data_dir="$DATA" --teacher="$1" --teacher_arch="$2" \
    --teacher_format="$TEACHER_FORMAT" --clus_pos_num="$K" --output="$3" \
    --batch_size="$BATCH" --workers="$WORKERS" --knn_backend="$BACKEND" "${flags[@]}"
}

if [ ${#names[@]} -eq 0 ]; then
  extract "${TEACHER:-checkpoints/moco_v2_800ep_pretrain.pth.tar}" "${TEACHER_ARCH:-resnet50}" \
    "${OUTPUT:-bags/moco_v2_800ep_k5.npy}"
fi
for name in "${names[@]}"; do
  teacher_row "$name"
  extract "$TEACHER_CHECKPOINT" "$TEACHER_BACKBONE" "$TEACHER_BAGS"
done
