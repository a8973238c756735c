#!/usr/bin/env bash
# The "MoCo v2 student alone" row: MoCo v2 from scratch, same queue, temperature and augmentations.
#   ARCH=resnet34 bash scripts/unsupervised/moco_baseline.sh   (SPEC: R-18 52.5 / 77.0, R-34 57.4 / 81.6)
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${ARCH:-resnet18}
RUN=${RUN:-runs/${ARCH/resnet/r}_moco_alone}
DATA=${DATA:-/datasets/imagenet}
GPUS=${GPUS:-8}
torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$GPUS" main_distill.py \
  --method=moco --data_dir="$DATA" --output_dir="$RUN" --arch="$ARCH" \
  --epochs=200 --batch_size=256 --lr=0.03 --weight_decay=1e-4 --temperature=0.2 --moco_momentum=0.999 \
  --queue_size=65536 --workers=8 --resume=auto "$@"
