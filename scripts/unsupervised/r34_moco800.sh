#!/usr/bin/env bash
# resnet34 student from MoCo v2 R-50, 800 ep (SPEC table: 66.1 / 87.2).
exec bash "$(dirname "$0")/distill.sh" bingo resnet34 moco800 "$@"
