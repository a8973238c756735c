#!/usr/bin/env bash
# resnet34 student from MoCo v2 R-50, 200 ep (SPEC table: 63.5 / 85.7).
exec bash "$(dirname "$0")/distill.sh" bingo resnet34 moco200 "$@"
