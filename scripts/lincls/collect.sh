#!/usr/bin/env bash
# Markdown table of every finished linear probe and kNN check below RUNS, beside SPEC's numbers.
set -euo pipefail
RUNS=runs

cd "$(dirname "$0")/../.."
python tools/collect_results.py "$RUNS" "$@"
