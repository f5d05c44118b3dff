#!/usr/bin/env bash
# Run on a lent GPU machine (its own python3 holds CUDA PyTorch; nothing is installed):
#   bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
out="${1:-${OUT:-.}}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/gpu_check.py --out "$out/gpu-check.md"
