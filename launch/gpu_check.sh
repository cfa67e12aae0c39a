#!/usr/bin/env bash
# GPU check of the fused philox noise (issue 11): noise GB/s vs a copy, kernel z vs the CPU reference,
# launches per MeZO step, step / forwards and peak memory vs inference, on a random-weight model built
# from an architecture JSON (no weights needed). Writes docs/gpu_check.json and docs/gpu_check.md.
#   bash launch/gpu_check.sh                                   # Llama-2-7B shape, bf16, batch 16 x 64
#   bash launch/gpu_check.sh --model-json configs/models/opt-13b.json --layers 8
# Exits with status 2 and a message, writing nothing, where torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch on $(hostname); nothing measured, docs/gpu_check.* untouched." >&2
  exit 2
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "gpu_check: triton is not importable; it ships with CUDA builds of torch (pip install torch)." >&2
  exit 2
fi
unset TRITON_INTERPRET  # the real compiler, not the CPU interpreter the unit tests use
exec "$PY" -m zofsdp.measure.gpu_check "$@"
