#!/usr/bin/env bash
# DisCo: resnet34 student from SwAV R-50w2 (no ResNet-34 number found). Recipe and sources: docs/peers.md.
exec bash "$(dirname "$0")/distill.sh" disco resnet34 swav_w2 "$@"
