#!/usr/bin/env bash
# The embedded default: the whole BINGO pipeline on real Fashion-MNIST, from a fresh clone.
#   1. teacher   main_distill.py --method=moco trains a ResNet-18 teacher, self-supervised, for
#                TEACHER_EPOCHS (longer than any student); trained once and kept, with its bags, in
#                $TEACHERS/<hash of its settings>/ for later runs
#   2. bags      knn_extract.py: its k=5 neighbour bags (bag precision and the teacher's sha256 in
#                the sidecar)
#   then for each seed of SEEDS (comma-separated; default 0):
#   3. students  from the teacher, STUDENT_EPOCHS each: BINGO, and the peers of PEERS (SEED, DisCo)
#   4. baseline  the same student by MoCo alone, with as much student compute as BINGO's: per image,
#                BINGO's student runs forward and backward on three views (anchor, neighbour, CutMix),
#                about 9 forward passes; MoCo's on one, plus its key encoder's forward: 4. So
#                9/4 x STUDENT_EPOCHS
#   5. eval      eval_knn.py kNN top-1 (k=20 and 200) and main_lincls.py linear probe of the teacher,
#                every student and the student at random init
#   6. report    $RUN/results.md (mean +- std over the seeds, and which claims held in how many
#                seeds), $RUN/seed<S>/results.md, $RUN/bags.png
# The same scripts as the ImageNet runs, with flags for 28 px greyscale images on 2 CPU cores:
# ResNet-18 on 28 px (torchvision's stem: the cheapest), crop/flip/brightness/contrast views, a
# queue below the 4 000 images, MoCo with the batch's keys as negatives (MoCo v2's queue alone
# collapses in runs this short), a probe on L2-normalised features (one lr fits every network).
# Every size is an environment variable; GPU=1 the one-GPU setting.
set -euo pipefail
cd "$(dirname "$0")/.."
# PY: another Python that has the requirements (e.g. a GPU machine's, offline); then nothing is installed.
if [ -z "${PY:-}" ]; then bash tools/setup.sh; PY=.venv/bin/python; fi
SOURCE=${SOURCE:-/usr/share/datasets/fashion-mnist}  # the IDX files (Debian's dataset-fashion-mnist)

# GPU=1: one GPU and 16 cores, all 60 000 images. On one H100 (README) these sizes, MoCo alone then at
# 6 epochs (now 4), ran in 8 min 36 s with the evaluations one after another (199 s: each is mostly
# start-up); all six at once took 57 s.
# One probe epoch is 234 steps, five times the CPU setting's 45.
if [ "${GPU:-0}" = 1 ]; then
  : "${TRAIN_PER_CLASS:=6000}" "${VAL_PER_CLASS:=1000}" "${QUEUE:=16384}"
  : "${TEACHER_EPOCHS:=10}" "${TEACHER_LR:=0.06}"
  : "${STUDENT_EPOCHS:=2}" "${PROBE_EPOCHS:=1}" "${WORKERS:=14}" "${DEVICE:=cuda}" "${DATA_PIPELINE:=cpu}"
  : "${EVAL_JOBS:=6}" "${PEERS=seed,disco}"
  : "${OMP_NUM_THREADS:=1}"  # as torchrun sets it: the main process launches GPU work, the workers need the cores
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
SEEDS=${SEEDS:-${SEED:-0}}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-400}   # of 6000 per class
VAL_PER_CLASS=${VAL_PER_CLASS:-500}       # of 1000 per class: a steadier top-1 than 100
DATA=${DATA:-datasets/fashion_mnist_${TRAIN_PER_CLASS}_${VAL_PER_CLASS}}
RUN=${RUN:-runs/fashion_mnist}
TEACHERS=${TEACHERS:-runs/fashion_mnist_teachers}  # one folder per teacher setting, kept between runs
ARCH=${ARCH:-resnet18}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-50}
TEACHER_LR=${TEACHER_LR:-0.03}  # the teacher's kNN top-1: 76.94 after 50 epochs at 0.03, 76.90 after 60 at 0.06
# 12: with 3, 6 or 9 the BINGO student stayed below the untrained network by kNN (k=20) in seed 0 (README)
STUDENT_EPOCHS=${STUDENT_EPOCHS:-12}
MOCO_EPOCHS=${MOCO_EPOCHS:-$(( 9 * STUDENT_EPOCHS / 4 ))}  # as much student compute as BINGO's (above)
# The peers, trained and evaluated as BINGO's student is (comma-separated: seed, disco). None on the
# CPU, where their 12 epochs would take the run past 15 minutes; PEERS=seed,disco adds them.
PEERS=${PEERS-}
PROBE_EPOCHS=${PROBE_EPOCHS:-3}
# kNN top-1 at k=20 (DINO's) and k=200 (the kNN monitor of MoCo's CIFAR demo). With 400 images a class,
# 20 neighbours reward pixel similarity, which an untrained network keeps; 200 ask for class structure.
KNN_K=${KNN_K:-20,200}
BATCH=${BATCH:-256}
LR=${LR:-0.06}
QUEUE=${QUEUE:-1024}   # below the number of training images: no image is its own negative
SIZE=${SIZE:-28}
WORKERS=${WORKERS:-2}
DEVICE=${DEVICE:-auto}
# gpu: the views drawn batched on DEVICE (here the CPU), the workers only decode: 1.2x the workers'
# PIL views on 2 cores. On an H100 the workers' views were the faster (README).
DATA_PIPELINE=${DATA_PIPELINE:-gpu}
# Networks evaluated at once, sharing the threads (GPU=1: all six; there each is mostly start-up). On 2
# cores the evaluation took 139 s one at a time, 103 s two at a time with a thread each, 306 s two at a
# time with two threads each (README).
EVAL_JOBS=${EVAL_JOBS:-2}
EVAL_THREADS=$(( OMP_NUM_THREADS > EVAL_JOBS ? OMP_NUM_THREADS / EVAL_JOBS : 1 ))
HOW=(--workers="$WORKERS" --device="$DEVICE")  # how the scripts run, not what they compute
EVAL=(--image_size="$SIZE" "${HOW[@]}")
VIEWS=(--augmentation=greyscale --data_pipeline="$DATA_PIPELINE" --image_size="$SIZE")
TRAIN=(--batch_size="$BATCH" --lr="$LR" "${VIEWS[@]}")
# checkpoint.pth every 10 epochs: its 0.6 s write was a tenth of every 7-second epoch.
RUNNING=(--save_freq=1000 --checkpoint_freq=10 --report_freq=20 "${HOW[@]}")
# Self-supervised without a teacher (the teacher itself, and the MoCo-alone baseline): the batch's
# other keys as negatives, a key encoder that is the student itself, no queue (keys of older steps
# differ from the batch's by their BatchNorm statistics and teach the network to tell batches apart).
MOCO=(--method=moco --moco_batch_keys --moco_momentum=0 --queue_size=0)
start=$SECONDS
stage() { echo "== $(( SECONDS - start ))s $*"; }

$PY -m data.fashion_mnist --source="$SOURCE" --out_dir="$DATA" --train_per_class="$TRAIN_PER_CLASS" --val_per_class="$VAL_PER_CLASS"

# The teacher depends on these settings alone (not on HOW): one cached teacher (and its bags) per combination.
TEACHER_FLAGS=("${MOCO[@]}" --arch="$ARCH" --data_dir="$DATA" --epochs="$TEACHER_EPOCHS" --seed=0 --batch_size="$BATCH"
               --lr="$TEACHER_LR" "${VIEWS[@]}")
TEACHER_DIR=$TEACHERS/$(echo "${TEACHER_FLAGS[*]}" | sha256sum | cut -c1-12)
TEACHER=$TEACHER_DIR/checkpoint_$(printf %04d "$TEACHER_EPOCHS").pth  # kept once its last epoch is done
BAGS=$TEACHER_DIR/bags.npy
if [ -f "$TEACHER" ]; then
  stage "1/5 teacher: $ARCH, $TEACHER_EPOCHS epochs, trained before: $TEACHER"
else
  stage "1/5 teacher: $ARCH, $TEACHER_EPOCHS epochs (kept in $TEACHER_DIR for later runs)"
  $PY main_distill.py "${TEACHER_FLAGS[@]}" "${RUNNING[@]}" --output_dir="$TEACHER_DIR" --resume=auto
fi
if [ -f "$BAGS.json" ]; then
  stage "2/5 bags: made before: $BAGS"
else
  stage "2/5 bags: k=5 nearest neighbours under the teacher"
  $PY knn_extract.py --data_dir="$DATA" --teacher="$TEACHER" --teacher_arch="$ARCH" \
    --clus_pos_num=5 --output="$BAGS" --batch_size=256 "${EVAL[@]}"
fi
if [ "${STOP_AFTER:-}" = bags ]; then exit 0; fi  # the teacher and its bags only, e.g. to prepare them

evaluate() {  # network seed: kNN top-1 and linear probe of $RUN/seed<seed>/<network>
  local out=$RUN/seed$2 pretrained
  case $1 in
    teacher) pretrained=$TEACHER ;;
    random_init) pretrained=random ;;
    *) pretrained=$out/$1/checkpoint.pth ;;
  esac
  { export OMP_NUM_THREADS=$EVAL_THREADS  # in the pipeline's subshell: this network's evaluation only
    $PY eval_knn.py --arch="$ARCH" --pretrained="$pretrained" --data_dir="$DATA" --output_dir="$out/eval/$1/knn" \
      --knn_k="$KNN_K" --batch_size=256 --report_freq=1000 --seed="$2" "${EVAL[@]}" &&
    $PY main_lincls.py --arch="$ARCH" --pretrained="$pretrained" --data_dir="$DATA" \
      --output_dir="$out/eval/$1/linear" --normalise_features --lr=3 --epochs="$PROBE_EPOCHS" --batch_size=256 \
      --val_freq="$PROBE_EPOCHS" --report_freq=1000 --seed="$2" "${EVAL[@]}"  # validated once, at the end
  } 2>&1 | sed -u "s/^/[$1] /"  # each line names its network: EVAL_JOBS > 1 interleaves them
}

for seed in ${SEEDS//,/ }; do
  out=$RUN/seed$seed
  FROM=(--teacher="$TEACHER" --teacher_arch="$ARCH" --arch="$ARCH" --data_dir="$DATA"
        --epochs="$STUDENT_EPOCHS" --queue_size="$QUEUE" --seed="$seed" "${TRAIN[@]}" "${RUNNING[@]}")
  stage "3/5 seed $seed students from the teacher, $STUDENT_EPOCHS epochs: BINGO${PEERS:+, ${PEERS//,/, }}"
  $PY main_distill.py --method=bingo --neighbours="$BAGS" --warmup_epochs=$(( STUDENT_EPOCHS * 11 / 200 )) \
    --output_dir="$out/bingo" "${FROM[@]}"
  for peer in ${PEERS//,/ }; do $PY main_distill.py --method="$peer" --output_dir="$out/$peer" "${FROM[@]}"; done

  stage "4/5 seed $seed baseline: $ARCH by MoCo alone, $MOCO_EPOCHS epochs"
  $PY main_distill.py "${MOCO[@]}" --arch="$ARCH" --data_dir="$DATA" --output_dir="$out/moco_alone" \
    --epochs="$MOCO_EPOCHS" --seed="$seed" "${TRAIN[@]}" "${RUNNING[@]}"

  stage "5/5 seed $seed evaluation: kNN (k=$KNN_K) and linear probe ($PROBE_EPOCHS epochs)"
  networks=(teacher bingo ${PEERS//,/ } moco_alone random_init) failed=()
  for (( i = 0; i < ${#networks[@]}; i += EVAL_JOBS )); do
    pids=()
    for network in "${networks[@]:i:EVAL_JOBS}"; do evaluate "$network" "$seed" & pids+=($!); done
    for j in "${!pids[@]}"; do wait "${pids[j]}" || failed+=("${networks[i + j]}"); done
  done
  if [ ${#failed[@]} -gt 0 ]; then  # after the others finished: their results are kept
    echo "error: seed $seed: the evaluation of ${failed[*]} failed (its lines above)" >&2; exit 1
  fi
done

$PY tools/fashion_report.py --run_dir="$RUN" --seeds="$SEEDS" --bags="$BAGS" --data_dir="$DATA" \
  --seconds=$(( SECONDS - start ))
