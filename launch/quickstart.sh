#!/usr/bin/env bash
# From a fresh clone: create .venv, install zofsdp, then fine-tune SmolLM2-135M on SST-2 with MeZO on
# 2 CPU ranks (FSDP2) and print dev accuracy before and after. Extra args are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} TOKENIZERS_PARALLELISM=false
OUT=runs/quickstart
for arg in "$@"; do case $arg in train.output_dir=*) OUT=${arg#*=} ;; esac; done
torchrun --standalone --nproc_per_node 2 -m zofsdp train -c configs/quickstart.yaml train.output_dir="$OUT" \
  train.overwrite=true "$@"  # a demo: running it again replaces the last one
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
records = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
evals = [r for r in records if "eval_accuracy" in r]
steps = [r for r in records if "projected_grad" in r]
print(f"SST-2 accuracy: {evals[0]['eval_accuracy']:.3f} before, {evals[-1]['eval_accuracy']:.3f} after "
      f"{steps[-1]['step']} MeZO steps ({steps[-1]['wall_s']:.0f} s); model in {out}/model")
PY
