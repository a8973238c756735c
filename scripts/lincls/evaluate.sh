#!/usr/bin/env bash
# kNN check (k = 20, 10, 200) and linear probe (SPEC stage 3) of a distilled student. Each row script
# sets ARCH and RUN (the distillation output_dir); extra flags pass through to both runs, e.g.
# EfficientNet-B0's --lr=3.0 --min_lr=0.001. Several nodes: set NNODES, NODE_RANK, MASTER_ADDR.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/datasets/imagenet}   # holds train/ and val/
launch=(torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
        --master_port="${MASTER_PORT:-29500}" --nproc_per_node="${GPUS:-8}" main_lincls.py
        --arch="$ARCH" --data_dir="$DATA" --pretrained="$RUN/checkpoint.pth")
"${launch[@]}" --eval=knn --knn_k=20,10,200 --output_dir="$RUN/knn" "$@"
"${launch[@]}" --eval=linear --resume=auto --output_dir="$RUN/lincls" "$@"
