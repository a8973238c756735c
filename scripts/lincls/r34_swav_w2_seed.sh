#!/usr/bin/env bash
# ResNet-34 distilled by SEED from SwAV R-50w2. Paper: no ResNet-34 number found (docs/peers.md).
export ARCH=resnet34 RUN=${RUN:-runs/r34_swav_w2_seed}
exec bash "$(dirname "$0")/evaluate.sh" "$@"
