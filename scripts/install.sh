#!/usr/bin/env bash
# Install herd (editable) with optional extras: `bash scripts/install.sh test`.
# torch: an installed torch is kept (the GPU machines carry their own); otherwise a CPU-only machine gets the CPU
# build, torch 2.13.0 (a bare `pip install torch` would pull several GB of CUDA packages). Outside machines that
# carry the CPU wheel locally, set HERD_TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch it from PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.11,<2.15"
  else
    "$PY" -m pip install -q "torch==2.13.0" ${HERD_TORCH_INDEX:+--index-url "$HERD_TORCH_INDEX"}
  fi
fi
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
