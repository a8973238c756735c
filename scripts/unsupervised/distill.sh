#!/usr/bin/env bash
# The released recipe on one 8-GPU node (SPEC stage 2), for one row of the paper's tables:
#   bash scripts/unsupervised/distill.sh METHOD STUDENT TEACHER [flags...]
# METHOD: bingo, seed or disco (docs/peers.md), or moco (MoCo v2 alone; TEACHER none). STUDENT: the
# --arch. TEACHER: a name of scripts/teachers.sh, whose checkpoint, backbone and bag file it uses
# (TEACHER=, TEACHER_ARCH=, NEIGHBOURS= override them). The run goes to runs/<student>_<teacher>...
# (RUN= overrides); extra flags pass through, after the recipe's. Several nodes: set NNODES,
# NODE_RANK, MASTER_ADDR.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/teachers.sh
method=$1 student=$2 name=$3
shift 3
RUN=${RUN:-$(run_name "$method" "$student" "$name")}
DATA=${DATA:-/datasets/imagenet}
GPUS=${GPUS:-8}
teacher=()
if [ "$method" != moco ]; then
  teacher_row "$name"
  teacher=(--teacher="${TEACHER:-$TEACHER_CHECKPOINT}" --teacher_arch="${TEACHER_ARCH:-$TEACHER_BACKBONE}")
  if [ "$method" = bingo ]; then
    teacher+=(--neighbours="${NEIGHBOURS:-$TEACHER_BAGS}")
  fi
fi
torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$GPUS" main_distill.py \
  --method="$method" --data_dir="$DATA" --output_dir="$RUN" --arch="$student" "${teacher[@]}" \
  --epochs=200 --batch_size=256 --lr=0.03 --weight_decay=1e-4 --temperature=0.2 \
  --queue_size=65536 --workers=8 --resume=auto "$@"
