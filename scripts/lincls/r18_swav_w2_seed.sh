#!/usr/bin/env bash
# ResNet-18 distilled by SEED from SwAV R-50w2. Paper (ImageNet linear, SPEC's peers): 63.0.
exec bash "$(dirname "$0")/evaluate.sh" seed resnet18 swav_w2 "$@"
