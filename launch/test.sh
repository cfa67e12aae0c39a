#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (unit, distributed, memory). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source .venv/bin/activate
export OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo TOKENIZERS_PARALLELISM=false
python -m pytest "$@"
