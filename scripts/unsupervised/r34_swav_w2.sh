#!/usr/bin/env bash
# resnet34 student from SwAV R-50w2 (SPEC table: 68.9 / 89.0).
exec bash "$(dirname "$0")/distill.sh" bingo resnet34 swav_w2 "$@"
