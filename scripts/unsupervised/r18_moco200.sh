#!/usr/bin/env bash
# resnet18 student from MoCo v2 R-50, 200 ep (SPEC table: 61.4 / 84.3).
exec bash "$(dirname "$0")/distill.sh" bingo resnet18 moco200 "$@"
