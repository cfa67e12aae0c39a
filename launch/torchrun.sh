#!/usr/bin/env bash
# zofsdp under torchrun on this machine (any backend: pick it in the config or with parallel.backend=...):
#   launch/torchrun.sh NPROC train [-c config.yaml] [section.key=value ...]
#   launch/torchrun.sh 2 train -c configs/tiny_llama.yaml parallel.backend=deepspeed
# Multi-node runs (torchrun rendezvous) are in docs/deepspeed.md and launch/slurm_multinode.sh.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC train|eval [-c config.yaml] [overrides...]}
shift
PY=${PYTHON:-python}
if ! command -v nvidia-smi >/dev/null; then
  # CPU ranks: split the cores between them, or every rank starts a thread per core.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
# --standalone: a rendezvous on a free local port, so that two runs on one machine do not collide.
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m zofsdp "$@"
