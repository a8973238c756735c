#!/usr/bin/env bash
# The "MoCo v2 student alone" row: MoCo v2 from scratch, same queue, temperature and augmentations.
#   ARCH=resnet34 bash scripts/unsupervised/moco_baseline.sh   (SPEC: R-18 52.5 / 77.0, R-34 57.4 / 81.6)
exec bash "$(dirname "$0")/distill.sh" moco "${ARCH:-resnet18}" none "$@"
