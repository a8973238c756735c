#!/usr/bin/env bash
# ResNet-18 distilled by DisCo from SwAV R-50w2. Paper (ImageNet linear, SPEC's peers): 65.2.
exec bash "$(dirname "$0")/evaluate.sh" disco resnet18 swav_w2 "$@"
