#!/usr/bin/env bash
# ResNet-34 trained by MoCo v2 alone (no teacher). Paper (ImageNet linear): 57.4 / 81.6.
exec bash "$(dirname "$0")/evaluate.sh" moco resnet34 none "$@"
