#!/usr/bin/env bash
# resnet34 student from MoCo v2 R-152 (SPEC table: 69.1 / 88.9).
exec bash "$(dirname "$0")/distill.sh" bingo resnet34 r152 "$@"
