#!/usr/bin/env bash
# The embedded default: the whole BINGO pipeline on real Fashion-MNIST, from a fresh clone.
#   1. teacher   main_distill.py --method=moco pretrains a ResNet-18 teacher (self-supervised)
#   2. bags      knn_extract.py builds its k=5 neighbour bags (prints bag precision)
#   3. student   main_distill.py distils a student from the teacher with BINGO
#   4. baseline  the same student trained by MoCo v2 alone for the same epochs
#   5. eval      main_lincls.py linear probe and eval_knn.py kNN top-1 of teacher, both students, random init
#   6. report    $RUN/results.md and $RUN/bags.png
# The same scripts and flags as the ImageNet runs, scaled to 2 CPU cores: 32 px crops, a class-
# balanced subset, short schedules, a queue sized to the data. Scale up with environment variables,
# e.g. on a GPU: TRAIN_PER_CLASS=6000 TEACHER_EPOCHS=100 STUDENT_EPOCHS=50 bash scripts/fashion_mnist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

SEED=${SEED:-0}
DATA=${DATA:-datasets/fashion_mnist_${TRAIN_PER_CLASS:-400}}
RUN=${RUN:-runs/fashion_mnist_seed${SEED}}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-400}   # of 6000 per class
VAL_PER_CLASS=${VAL_PER_CLASS:-100}       # of 1000 per class
TEACHER_ARCH=${TEACHER_ARCH:-resnet18}
STUDENT_ARCH=${STUDENT_ARCH:-resnet18}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-5}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-2}
PROBE_EPOCHS=${PROBE_EPOCHS:-3}
BATCH=${BATCH:-64}
QUEUE=${QUEUE:-4096}
SIZE=${SIZE:-32}
WORKERS=${WORKERS:-2}
DEVICE=${DEVICE:-auto}
COMMON=(--image_size="$SIZE" --workers="$WORKERS" --device="$DEVICE")
TRAIN=(--batch_size="$BATCH" --queue_size="$QUEUE" --save_freq=1000 --report_freq=20 --seed="$SEED" "${COMMON[@]}")
start=$SECONDS

$PY -m data.fashion_mnist --out_dir="$DATA" --train_per_class="$TRAIN_PER_CLASS" --val_per_class="$VAL_PER_CLASS"

echo "== 1/5 teacher: MoCo v2 $TEACHER_ARCH, $TEACHER_EPOCHS epochs"
$PY main_distill.py --method=moco --arch="$TEACHER_ARCH" --data_dir="$DATA" --output_dir="$RUN/teacher" \
  --epochs="$TEACHER_EPOCHS" "${TRAIN[@]}"

echo "== 2/5 bags: k=5 nearest neighbours under the teacher"
$PY knn_extract.py --data_dir="$DATA" --teacher="$RUN/teacher/checkpoint.pth" --teacher_arch="$TEACHER_ARCH" \
  --clus_pos_num=5 --output="$RUN/bags.npy" --batch_size=256 "${COMMON[@]}"

echo "== 3/5 student: BINGO $STUDENT_ARCH from the teacher, $STUDENT_EPOCHS epochs"
$PY main_distill.py --method=bingo --arch="$STUDENT_ARCH" --data_dir="$DATA" --output_dir="$RUN/bingo" \
  --teacher="$RUN/teacher/checkpoint.pth" --teacher_arch="$TEACHER_ARCH" --neighbours="$RUN/bags.npy" \
  --epochs="$STUDENT_EPOCHS" --warmup_epochs=$(( STUDENT_EPOCHS * 11 / 200 )) "${TRAIN[@]}"

echo "== 4/5 baseline: MoCo v2 $STUDENT_ARCH alone, $STUDENT_EPOCHS epochs"
$PY main_distill.py --method=moco --arch="$STUDENT_ARCH" --data_dir="$DATA" --output_dir="$RUN/moco_alone" \
  --epochs="$STUDENT_EPOCHS" "${TRAIN[@]}"

echo "== 5/5 evaluation: linear probe ($PROBE_EPOCHS epochs) and kNN (k=20)"
evaluate() {  # name arch pretrained
  $PY eval_knn.py --arch="$2" --pretrained="$3" --data_dir="$DATA" \
    --output_dir="$RUN/eval/$1/knn" --batch_size=256 --report_freq=1000 --seed="$SEED" "${COMMON[@]}"
  $PY main_lincls.py --arch="$2" --pretrained="$3" --data_dir="$DATA" --output_dir="$RUN/eval/$1/linear" \
    --epochs="$PROBE_EPOCHS" --batch_size=256 --report_freq=1000 --seed="$SEED" "${COMMON[@]}"
}
evaluate teacher "$TEACHER_ARCH" "$RUN/teacher/checkpoint.pth"
evaluate bingo "$STUDENT_ARCH" "$RUN/bingo/checkpoint.pth"
evaluate moco_alone "$STUDENT_ARCH" "$RUN/moco_alone/checkpoint.pth"
evaluate random_init "$STUDENT_ARCH" random

$PY tools/fashion_report.py --run_dir="$RUN" --data_dir="$DATA" --seconds=$(( SECONDS - start ))
