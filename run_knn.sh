#!/usr/bin/env bash
# Stage 1: embed every training image with the frozen teacher and write its k nearest neighbours
# (the bags) to an (N, k) .npy with a .json sidecar. Edit the variables, or override them:
#   TEACHER=checkpoints/swav_RN50w2_400ep_pretrain.pth.tar TEACHER_ARCH=resnet50w2 \
#   OUTPUT=bags/swav_w2_k5.npy bash run_knn.sh
set -euo pipefail
DATA=${DATA:-/datasets/imagenet}                                  # ImageFolder root with train/
TEACHER=${TEACHER:-checkpoints/moco_v2_800ep_pretrain.pth.tar}     # released teacher checkpoint
TEACHER_ARCH=${TEACHER_ARCH:-resnet50}
TEACHER_FORMAT=${TEACHER_FORMAT:-auto}                             # auto|moco|swav|torchvision|bingo
K=${K:-5}                                                          # clus_pos_num
OUTPUT=${OUTPUT:-bags/moco_v2_800ep_k5.npy}
GPUS=${GPUS:-8}
BATCH=${BATCH:-$((256 * GPUS * ${NNODES:-1}))}                      # global batch (256 per GPU)
WORKERS=${WORKERS:-8}
BACKEND=${BACKEND:-auto}                                           # auto|faiss|torch

torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$GPUS" knn_extract.py \
  --data_dir="$DATA" --teacher="$TEACHER" --teacher_arch="$TEACHER_ARCH" \
  --teacher_format="$TEACHER_FORMAT" --clus_pos_num="$K" --output="$OUTPUT" \
  --batch_size="$BATCH" --workers="$WORKERS" --knn_backend="$BACKEND" "$@"
