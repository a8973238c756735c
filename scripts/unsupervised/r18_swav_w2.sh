#!/usr/bin/env bash
# resnet18 student from SwAV R-50w2 (SPEC table: 65.5 / 87.0).
exec bash "$(dirname "$0")/distill.sh" bingo resnet18 swav_w2 "$@"
