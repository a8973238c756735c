#!/usr/bin/env bash
# The GPU numbers of BENCHMARKS.md, one command on one CUDA device (python3 with torch,
# torchvision, absl-py, numpy, Pillow; no network). About 5 minutes on one H100; every stage has a
# time limit and no stage starts after $BUDGET seconds (default 420).
#   1. bench_step.py: reference vs fast (eager) vs --fast (CUDA graph) at 32 and 128 per GPU
#      (ResNet-18 student, ResNet-50 teacher, 224 px, K = 65 536), first-step loss checked;
#   2. bench_knn.py: stage 1's search at 1 281 167 x 2048 and x 4096, uniform and clustered,
#      sampled rows checked against the exact float64 search, seconds and peak memory;
#   3. bench_data.py: the GPU pipeline's decode and views per batch, data alone and data + --fast
#      step for both pipelines (real ImageNet JPEGs from datasets/foolbox-3.3.4-py3-none-any.whl).
# STAGES (default "step knn data") picks stages; STEP_BATCHES, KNN_CASES their sizes.
# Output: $OUT (default benchmarks/out)/run_gpu.log and JSON files. Exits 1 if a stage fails or
# is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run_gpu.log") 2>&1

DEADLINE=$((SECONDS + ${BUDGET:-420}))
status=0
stage() {  # stage LIMIT_S CMD...: run CMD for at most LIMIT_S seconds (less if the deadline is near)
  local limit=$1 left=$((DEADLINE - SECONDS))
  shift
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "SKIP (time budget spent): $*"
    status=1
    return
  fi
  echo "== $* (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== exit $rc after $((SECONDS - start))s"
  ((rc == 0)) || status=1
}

date -u +%Y-%m-%dT%H:%M:%SZ
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)'

STAGES=" ${STAGES:-step knn data} "
STEP=(-m benchmarks.bench_step --device=cuda --arch=resnet18 --teacher_arch=resnet50 --image_size=224 --queue_size=65536 --modes=reference,fast,graph)
[[ $STAGES == *" step "* ]] && for b in ${STEP_BATCHES:-32 128}; do
  stage 90 "$PYTHON" "${STEP[@]}" --batch_size="$b" --json="$OUT/step_b$b.json"
done
[[ $STAGES == *" knn "* ]] && stage 260 "$PYTHON" -m benchmarks.bench_knn --cases="${KNN_CASES:-uniform:2048,clustered:2048,uniform:4096,clustered:4096}" \
  --json="$OUT/knn.json"
[[ $STAGES == *" data "* ]] && stage 150 "$PYTHON" -m benchmarks.bench_data --source=datasets/foolbox-3.3.4-py3-none-any.whl --train \
  --workers=8,16 --steps=15 --json="$OUT/data.json"
echo "run_gpu.sh: $([ $status = 0 ] && echo PASS || echo FAIL) after ${SECONDS}s"
exit $status
