#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md, one command on one CUDA device (python3 with torch, torchvision,
# absl-py, numpy; no pytest, no network). About 5 minutes on one H100; every stage has a time
# limit and the whole script stops starting stages after 7 minutes.
#   1. check_gpu.py: the fast step computes the released step on this GPU (PASS/FAIL lines);
#   2. bench_step.py, eager: reference vs bf16 vs fast at 128 and 32 per GPU (ResNet-18 student,
#      ResNet-50 teacher, 224 px, K = 65 536);
#   3. bench_knn.py: exact kNN engines (owned by the kNN half; see its own docstring);
#   4. bench_step.py, compiled: reference vs fast_compile at 128 and 32 (compiling takes minutes).
# Output: $OUT (default benchmarks/out)/run_gpu.log and step_*.json. Exits 1 if any stage fails,
# times out or is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/run_gpu.log") 2>&1

DEADLINE=$((SECONDS + 460))
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

STEP=(benchmarks/bench_step.py --device=cuda --arch=resnet18 --teacher_arch=resnet50 --image_size=224 --queue_size=65536)
stage 90 "$PYTHON" benchmarks/check_gpu.py
stage 60 "$PYTHON" "${STEP[@]}" --batch_size=128 --modes=reference,bf16,fast --json="$OUT/step_b128_eager.json"
stage 60 "$PYTHON" "${STEP[@]}" --batch_size=32 --modes=reference,bf16,fast --json="$OUT/step_b32_eager.json"
stage 220 "$PYTHON" benchmarks/bench_knn.py --device=cuda --n=1281167 --dim=2048 --k=5 --backends=torch,torch_fast
stage 200 "$PYTHON" "${STEP[@]}" --batch_size=128 --modes=reference,fast_compile --json="$OUT/step_b128_compile.json"
stage 170 "$PYTHON" "${STEP[@]}" --batch_size=32 --modes=reference,fast_compile --json="$OUT/step_b32_compile.json"
echo "run_gpu.sh: $([ $status = 0 ] && echo PASS || echo FAIL) after ${SECONDS}s"
exit $status
