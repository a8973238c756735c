#!/usr/bin/env bash
# The released BINGO recipe on one 8-GPU node (SPEC stage 2). Each row script of the paper's table
# sets TEACHER, TEACHER_ARCH, NEIGHBOURS, ARCH and RUN, then calls this; extra flags pass through.
# The peers' rows set METHOD=seed or disco instead of NEIGHBOURS (docs/peers.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/datasets/imagenet}
GPUS=${GPUS:-8}
torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$GPUS" main_distill.py \
  --method="${METHOD:-bingo}" --data_dir="$DATA" --output_dir="$RUN" --arch="$ARCH" \
  --teacher="$TEACHER" --teacher_arch="$TEACHER_ARCH" ${NEIGHBOURS:+--neighbours="$NEIGHBOURS"} \
  --epochs=200 --batch_size=256 --lr=0.03 --weight_decay="${WD:-1e-4}" --temperature="${T:-0.2}" \
  --queue_size=65536 --workers=8 --resume=auto "$@"
