#!/usr/bin/env bash
# DisCo: resnet18 student from SwAV R-50w2 (SPEC, peers: 65.2 top-1). Recipe and sources: docs/peers.md.
set -euo pipefail
export METHOD=disco ARCH=resnet18 RUN=${RUN:-runs/r18_swav_w2_disco}
export TEACHER=${TEACHER:-checkpoints/swav_RN50w2_400ep_pretrain.pth.tar} TEACHER_ARCH=resnet50w2
exec bash "$(dirname "$0")/distill.sh" "$@"
