#!/usr/bin/env bash
# DisCo: resnet18 student from SwAV R-50w2 (SPEC, peers: 65.2 top-1). Recipe and sources: docs/peers.md.
exec bash "$(dirname "$0")/distill.sh" disco resnet18 swav_w2 "$@"
