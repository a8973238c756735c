#!/usr/bin/env bash
# The test suite on CPU, from a fresh clone: sets up .venv, then runs pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
exec .venv/bin/python -m pytest -q "$@" tests
