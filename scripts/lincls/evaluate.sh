#!/usr/bin/env bash
# kNN check (eval_knn.py, k = 20, 10, 200) and linear probe (main_lincls.py, SPEC stage 3) of the
# student of one row of the paper's tables:
#   bash scripts/lincls/evaluate.sh METHOD STUDENT TEACHER [probe flags...]
# as scripts/unsupervised/distill.sh names the row; it reads the run's checkpoint.pth (RUN= names
# another run folder). Extra flags go to the probe, e.g. EfficientNet-B0's --lr=3.0 --min_lr=0.001;
# KNN_FLAGS to the kNN check. Several nodes: set NNODES, NODE_RANK, MASTER_ADDR.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/teachers.sh
RUN=${RUN:-$(run_name "$1" "$2" "$3")}
shift 3
DATA=${DATA:-/datasets/imagenet}   # holds train/ and val/
launch=(torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
        --master_port="${MASTER_PORT:-29500}" --nproc_per_node="${GPUS:-8}")
backbone=(--data_dir="$DATA" --pretrained="$RUN/checkpoint.pth")  # its --arch is the checkpoint's
"${launch[@]}" eval_knn.py "${backbone[@]}" --knn_k=20,10,200 --output_dir="$RUN/knn" ${KNN_FLAGS:-}
"${launch[@]}" main_lincls.py "${backbone[@]}" --resume=auto --output_dir="$RUN/lincls" "$@"
