#!/usr/bin/env bash
# Linear probe (SPEC stage 3) and kNN check of ResNet-18 distilled from R-152.
# Paper (ImageNet linear): 65.9 / 87.1. Extra flags are passed to both runs; several nodes: add
# --nnodes, --node_rank and --master_addr to torchrun.
set -euo pipefail
DATA=/path/to/imagenet  # holds train/ and val/
RUN=runs/r18_r152  # the distillation output_dir (checkpoint.pth)

cd "$(dirname "$0")/../.."
torchrun --nproc_per_node=${GPUS:-8} main_lincls.py --eval=knn --knn_k=20,10,200 --arch=resnet18 \
  --data_dir="$DATA" --pretrained="$RUN/checkpoint.pth" --output_dir="$RUN/knn" "$@"
torchrun --nproc_per_node=${GPUS:-8} main_lincls.py --arch=resnet18 --resume=auto \
  --data_dir="$DATA" --pretrained="$RUN/checkpoint.pth" --output_dir="$RUN/lincls" "$@"
