#!/usr/bin/env bash
# Semi-supervised ImageNet evaluation of a distilled ResNet-18 (SPEC's table: 1 % and 10 % of the
# labels, SimCLR's subsets), of the student of one row of the paper's tables:
#   bash scripts/semi/evaluate.sh METHOD STUDENT TEACHER [flags...]
# as scripts/unsupervised/distill.sh names the row (RUN= names another run folder). This trains on
# both subsets with both protocols: finetune (the whole network; what the paper reports) and linear
# (a probe of the frozen backbone; DisCo's protocol). Extra flags pass through to all four runs.
# SimCLR's lists, 1percent.txt and 10percent.txt (one file name per line), are published at
# https://github.com/google-research/simclr/tree/master/imagenet_subsets; download them to SUBSETS.
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/teachers.sh
RUN=${RUN:-$(run_name "$1" "$2" "$3")}
shift 3
DATA=${DATA:-/datasets/imagenet}              # holds train/ and val/
SUBSETS=${SUBSETS:-/datasets/imagenet_subsets}  # holds 1percent.txt and 10percent.txt
launch=(torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
        --master_port="${MASTER_PORT:-29500}" --nproc_per_node="${GPUS:-8}" main_lincls.py
        --data_dir="$DATA" --pretrained="$RUN/checkpoint.pth" --resume=auto)  # its --arch is the checkpoint's
# Fine-tuning: 20 epochs, batch 256, cosine; backbone / classifier lr per share of labels as in
# SwAV's semi-supervised recipe (not from the BINGO release, which gives none).
"${launch[@]}" --protocol=finetune --train_subset="$SUBSETS/1percent.txt" --backbone_lr=0.02 --lr=5.0 \
  --output_dir="$RUN/semi_1pct_finetune" "$@"
"${launch[@]}" --protocol=finetune --train_subset="$SUBSETS/10percent.txt" --backbone_lr=0.01 --lr=0.2 \
  --output_dir="$RUN/semi_10pct_finetune" "$@"
# Linear: SPEC's probe recipe (lr 30 cosine to 0.01, 120 epochs) on the labelled images only.
"${launch[@]}" --protocol=linear --train_subset="$SUBSETS/1percent.txt" \
  --output_dir="$RUN/semi_1pct_linear" "$@"
"${launch[@]}" --protocol=linear --train_subset="$SUBSETS/10percent.txt" \
  --output_dir="$RUN/semi_10pct_linear" "$@"
