#!/usr/bin/env bash
# On a GPU, every fast path computes what the reference computes: one command, under 5 minutes on
# one H100, python3 with torch, torchvision, absl-py, numpy, Pillow and pytest, no network.
#   1. the CUDA tests (nvJPEG against PIL and its stream hazard, fp16 resampling and compiled
#      colour ops against the CPU, the certified kNN against the exact search);
#   2. benchmarks/check_gpu.py: --fast_views within the GPU's noise floor, bf16 within its
#      tolerance, the CUDA-graph step equal to the eager one, no host synchronisation;
#   3. benchmarks/gpu_smoke.py: the three stages through torchrun with each fast flag alone and
#      all together, with both data pipelines (PASS/FAIL per run; see its docstring).
# Needs foolbox's wheel (its ImageNet photos) at datasets/foolbox-3.3.4-py3-none-any.whl:
#   pip download --no-deps -d datasets foolbox==3.3.4
# Logs under $WORK (default /tmp/bingo_gpu_smoke); exits 1 on any FAIL.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/bingo_gpu_smoke}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
status=0
echo "== 1. CUDA tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -s -k cuda tests/test_gpu_augment.py tests/test_knn.py \
  && echo "PASS CUDA tests" || { echo "FAIL CUDA tests"; status=1; }
echo "== 2. fast step against the reference"
"$PYTHON" -m benchmarks.check_gpu || status=1
echo "== 3. the three stages"
"$PYTHON" -m benchmarks.gpu_smoke --work="$WORK" "$@" || status=1
echo "gpu_smoke.sh: $([ $status = 0 ] && echo PASS || echo FAIL) after ${SECONDS}s"
exit $status
