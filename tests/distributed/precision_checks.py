"""Run by test_precision.py (under torchrun, or plain python for one process): probe cycles on tiny-llama.

`python precision_checks.py CYCLES OVERRIDE...` runs CYCLES MeZO steps with lr 0 (+εz, −2εz, restore, no
update) through the real forwards, then prints one JSON line per rank: how many shard elements differ
from before (bit for bit) and the projected gradients (non-zero: the forwards saw the probes).
"""

from __future__ import annotations

import json
import sys

import torch

from zofsdp.config import load_config
from zofsdp.optim import build_optimizer
from zofsdp.scoring import encode
from zofsdp.train import global_loss, setup

ARGS = ["model.name_or_path=tiny-llama", "data.num_train=8", "data.num_dev=0", "data.num_eval=0",
        "train.batch_size=4", "zo.eps=1e-2", "zo.lr=0", "zo.weight_decay=0", "model.max_length=32"]


def main(cycles: int, overrides: list[str]) -> None:
    session = setup(load_config(None, ARGS + overrides))
    backend = session.backend
    batch = encode(session.tokenizer, session.splits.train[:4], 32)
    opt = build_optimizer(session.cfg.zo, backend.shards(), 0, backend.device, blocks=backend.blocks(),
                          probe=backend.probe, rounding=session.cfg.model.update_rounding)
    before = [s.data.clone() for s in opt.shards]
    with torch.no_grad():
        grads = [opt.step(lambda: global_loss(session, batch)[0], step)["projected_grad"]
                 for step in range(cycles)]
    changed = sum(int((s.data != b).sum()) for s, b in zip(opt.shards, before))
    print(json.dumps({"rank": backend.rank, "changed": changed, "numel": sum(b.numel() for b in before),
                      "probe": backend.probe is not None, "grads": grads}), flush=True)
    backend.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
