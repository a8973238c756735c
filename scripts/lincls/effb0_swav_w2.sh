#!/usr/bin/env bash
# Linear probe (SPEC stage 3) and kNN check of EfficientNet-B0 distilled from SwAV R-50w2.
# Paper (ImageNet linear): 69.3 top-1. Extra flags are passed to both runs; several nodes: add
# --nnodes, --node_rank and --master_addr to torchrun.
set -euo pipefail
DATA=/path/to/imagenet  # holds train/ and val/
RUN=runs/effb0_swav_w2  # the distillation output_dir (checkpoint.pth)

cd "$(dirname "$0")/../.."
torchrun --nproc_per_node=${GPUS:-8} main_lincls.py --eval=knn --knn_k=20,10,200 --arch=efficientnet_b0 \
  --data_dir="$DATA" --pretrained="$RUN/checkpoint.pth" --output_dir="$RUN/knn" "$@"
torchrun --nproc_per_node=${GPUS:-8} main_lincls.py --arch=efficientnet_b0 --lr=3.0 --min_lr=0.001 --resume=auto \
  --data_dir="$DATA" --pretrained="$RUN/checkpoint.pth" --output_dir="$RUN/lincls" "$@"
