#!/usr/bin/env bash
# zofsdp under DeepSpeed's launcher on this machine, ZeRO-3 backend:
#   launch/deepspeed.sh NPROC train [-c config.yaml] [section.key=value ...]
#   launch/deepspeed.sh 2 train -c configs/deepspeed_tiny.yaml
# NPROC processes: one per GPU, or CPU ranks where there is no GPU (DS_ACCELERATOR=cpu). Extra launcher
# flags (a hostfile, --include, ...) go in DS_LAUNCHER_ARGS; docs/deepspeed.md shows multi-node runs.
set -euo pipefail
NPROC=${1:?usage: launch/deepspeed.sh NPROC train|eval [-c config.yaml] [overrides...]}
shift
PY=${PYTHON:-python}
if ! command -v nvidia-smi >/dev/null; then
  export DS_ACCELERATOR=cpu
  # DeepSpeed's launcher leaves OMP_NUM_THREADS alone on CPU: without it every rank starts a thread per
  # core and the ranks fight for the cores. Split the cores between the ranks instead.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
# Where the CPU shared-memory op compiles once (~46 s) and is reused: inside the Python environment.
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PY" -c 'import sys; print(sys.prefix)')/torch_extensions}
export TORCH_EXTENSIONS_DIR
# A free port unless one is given, so that two runs on one machine do not collide.
PORT=${MASTER_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
COMMAND=$1
shift
# --module: run `python -m zofsdp`; the launcher's --local_rank argument is dropped by zofsdp's CLI.
# shellcheck disable=SC2086  # DS_LAUNCHER_ARGS is a list of flags
exec "$PY" -m deepspeed.launcher.runner --num_accelerators "$NPROC" --master_port "$PORT" ${DS_LAUNCHER_ARGS:-} \
  --module zofsdp "$COMMAND" parallel.backend=deepspeed "$@"
