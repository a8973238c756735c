#!/usr/bin/env bash
# ResNet-34 distilled by SEED from SwAV R-50w2. Paper: no ResNet-34 number found (docs/peers.md).
exec bash "$(dirname "$0")/evaluate.sh" seed resnet34 swav_w2 "$@"
