#!/usr/bin/env bash
# resnet18 student from MoCo v2 R-50, 800 ep (SPEC table: 64.0 / 85.7).
exec bash "$(dirname "$0")/distill.sh" bingo resnet18 moco800 "$@"
