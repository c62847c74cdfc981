#!/usr/bin/env bash
# The original launch convention: XFL_CONFIG=configs/vis2ir_cross_attention.yaml bash scripts/train.sh
# Runs from any working directory; uses every visible GPU (set CUDA_VISIBLE_DEVICES to choose).
# Extra arguments pass through, e.g. `bash scripts/train.sh train.max_steps=100 --resume latest`.
set -euo pipefail
: "${XFL_CONFIG:?set XFL_CONFIG to a config file, e.g. XFL_CONFIG=configs/vis2ir_cross_attention.yaml}"
case "$XFL_CONFIG" in
  /*) config="$XFL_CONFIG" ;;
  *) if [ -f "$XFL_CONFIG" ]; then config="$(pwd)/$XFL_CONFIG"
     else config="$(cd "$(dirname "$0")/.." && pwd)/$XFL_CONFIG"; fi ;;
esac
exec vis2ir train --config "$config" "$@"
