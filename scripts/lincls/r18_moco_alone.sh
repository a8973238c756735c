#!/usr/bin/env bash
# ResNet-18 trained by MoCo v2 alone (no teacher). Paper (ImageNet linear): 52.5 / 77.0.
exec bash "$(dirname "$0")/evaluate.sh" moco resnet18 none "$@"
