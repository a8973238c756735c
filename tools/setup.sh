#!/usr/bin/env bash
# Prepare a fresh machine for every command of this repository: the virtual environment .venv with
# requirements.txt (reinstalled only when that file changes) and, where we run as root, Debian's
# real Fashion-MNIST (dataset-fashion-mnist) for the embedded default run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  echo "installing requirements.txt into .venv (torch takes about a minute)"
  # -qq: errors only; pip's warnings about this machine's index folders would read as failures.
  .venv/bin/pip install -qq --disable-pip-version-check -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's dataset-fashion-mnist"
  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null
fi
