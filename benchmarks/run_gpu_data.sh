#!/usr/bin/env bash
# The GPU checks of `main_distill.py --data_pipeline=gpu`, one command, about 3 minutes on one
# H100 with 16 cores:
#   1. tests/test_gpu_augment.py with its CUDA tests (CUDA views equal CPU views; nvJPEG decodes
#      close to PIL, and non-JPEG / greyscale / CMYK files fall back to the CPU on a CUDA run);
#   2. bench_data.py on 4096 copies of real ImageNet JPEGs re-encoded as baseline (as ImageNet's
#      own files): the released CPU pipeline and the GPU pipeline with 4 and 16 workers, data
#      alone and data + BINGO training step, and the training step alone;
#   3. the GPU pipeline on the same images as foolbox ships them (progressive JPEGs, which nvJPEG
#      decodes in software, one by one);
#   4. a check that every measurement is there, then a summary.
# Exits non-zero if a test fails, a pipeline yields a bad view or a number is missing.
# Needs foolbox's wheel (its imagenet_*.jpg) at datasets/foolbox-3.3.4-py3-none-any.whl, fetched
# with pip when missing; on a machine without network, bring that file along.
# Results: $BENCH_OUT (default runs/bench_data)/{baseline,original}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BENCH_OUT=${BENCH_OUT:-runs/bench_data}
WHEEL=datasets/foolbox-3.3.4-py3-none-any.whl
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning

[ -f "$WHEEL" ] || "$PYTHON" -m pip download -q --no-deps -d datasets foolbox==3.3.4
"$PYTHON" -c 'import torch, torchvision
assert torch.cuda.is_available(), "run_gpu_data.sh needs a CUDA device"
print("torch", torch.__version__, "torchvision", torchvision.__version__, "on", torch.cuda.get_device_name())'

echo "== 1. tests (the CUDA ones included)"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_augment.py

echo "== 2. baseline JPEGs: cpu and gpu pipelines"
"$PYTHON" -m benchmarks.bench_data --source="$WHEEL" --encoding=baseline --workers=4,16 --train \
  --json="$BENCH_OUT/baseline.json"

echo "== 3. progressive JPEGs as shipped: gpu pipeline"
"$PYTHON" -m benchmarks.bench_data --source="$WHEEL" --encoding=original --pipelines=gpu --workers=16 \
  --json="$BENCH_OUT/original.json"

echo "== 4. check and summary"
"$PYTHON" - "$BENCH_OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
baseline = json.load(open(os.path.join(out, 'baseline.json')))
original = json.load(open(os.path.join(out, 'original.json')))
rate = {(r['pipeline'], r['workers'], r['what']): r['samples_per_s'] for r in baseline['results']}
expected = [('none', 0, 'step only')] + [(p, w, what) for p in ('cpu', 'gpu') for w in (4, 16)
                                           for what in ('data', 'data + step')]
missing = [key for key in expected if not rate.get(key, 0) > 0]
if missing or not all(r['samples_per_s'] > 0 for r in original['results']):
    sys.exit(f'missing or zero measurements: {missing or original["results"]}')
print(f'{baseline["cuda_name"]}, {baseline["cpus"]} CPUs, batch {baseline["flags"]["batch_size"]}, '
      f'{baseline["flags"]["image_size"]} px')
print(f'training step alone            {rate["none", 0, "step only"]:8.1f} samples/s')
for w in (4, 16):
    for what in ('data', 'data + step'):
        cpu, gpu = rate['cpu', w, what], rate['gpu', w, what]
        print(f'{w:2d} workers, {what:11s}: cpu {cpu:8.1f} ({cpu / w:5.1f}/worker)  gpu {gpu:8.1f}  '
              f'gpu/cpu {gpu / cpu:5.2f}')
for r in original['results']:
    print(f'progressive JPEGs, gpu pipeline, {r["workers"]} workers, {r["what"]}: {r["samples_per_s"]:8.1f} samples/s')
EOF
