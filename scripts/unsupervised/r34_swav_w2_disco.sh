#!/usr/bin/env bash
# DisCo: resnet34 student from SwAV R-50w2 (no ResNet-34 number found). Recipe and sources: docs/peers.md.
set -euo pipefail
export METHOD=disco ARCH=resnet34 RUN=${RUN:-runs/r34_swav_w2_disco}
export TEACHER=${TEACHER:-checkpoints/swav_RN50w2_400ep_pretrain.pth.tar} TEACHER_ARCH=resnet50w2
exec bash "$(dirname "$0")/distill.sh" "$@"
