#!/usr/bin/env bash
# Markdown table of every finished linear probe and kNN check below RUNS (default: the repository's
# runs/), beside SPEC's numbers. PYTHON: the interpreter (default: the project's .venv, else python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${RUNS:-$repo/runs}
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x "$repo/.venv/bin/python" ]; then
    PYTHON=$repo/.venv/bin/python
  fi
fi
"$PYTHON" "$repo/tools/collect_results.py" "$RUNS" "$@"
