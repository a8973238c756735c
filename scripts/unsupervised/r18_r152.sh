#!/usr/bin/env bash
# resnet18 student from MoCo v2 R-152 (SPEC table: 65.9 / 87.1).
exec bash "$(dirname "$0")/distill.sh" bingo resnet18 r152 "$@"
