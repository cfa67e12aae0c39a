"""Run by test_precision.py (under torchrun, or plain python for one process): probe cycles on tiny-llama.

`python precision_checks.py OUT_DIR CYCLES OVERRIDE...` runs CYCLES MeZO steps with lr 0 (+εz, −2εz, restore,
no update) through the real forwards, then writes OUT_DIR/rank<r>.json per rank: how many shard elements
differ from before (bit for bit) and the projected gradients (non-zero: the forwards saw the probes).
One file per rank, not stdout: ranks sharing one pipe can interleave their lines (seen once in CI).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from zofsdp.config import load_config
from zofsdp.optim import build_optimizer
from zofsdp.scoring import encode
from zofsdp.train import global_loss, setup

ARGS = ["model.name_or_path=tiny-llama", "data.num_train=8", "data.num_dev=0", "data.num_eval=0",
        "train.batch_size=4", "zo.eps=1e-2", "zo.lr=0", "zo.weight_decay=0", "model.max_length=32"]


def main(out_dir: Path, cycles: int, overrides: list[str]) -> None:
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
    result = {"rank": backend.rank, "changed": changed, "numel": sum(b.numel() for b in before),
              "probe": backend.probe is not None, "grads": grads}
    (out_dir / f"rank{backend.rank}.json").write_text(json.dumps(result))
    backend.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
