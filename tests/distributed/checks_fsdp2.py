"""Run under torchrun by test_fsdp2.py: checks that need a live process group, one per argv[1]."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from zofsdp.config import load_config
from zofsdp.optim import build_optimizer
from zofsdp.scoring import encode
from zofsdp.train import global_loss, setup

ARGS = ["model.name_or_path=tiny-llama", "parallel.backend=fsdp2", "data.num_train=16", "data.num_dev=0",
        "data.num_eval=0", "train.batch_size=8", "zo.eps=1e-2"]


def session_and_batch(extra: list[str] = ()):
    session = setup(load_config(None, ARGS + list(extra)))
    batch = encode(session.tokenizer, session.splits.train[:8], 64)
    return session, batch


def root_trap() -> None:
    """Perturbing only the root's parameters (embeddings, final norm) must change the loss."""
    session, batch = session_and_batch()
    opt = build_optimizer(session.cfg.zo, session.backend.shards(), 0)
    root = [s for s in opt.shards if s.group in ("embed", "head")]
    assert root and len(root) < len(opt.shards)
    base, _ = global_loss(session, batch)
    global_loss(session, batch)  # a second forward: the trap shows after one has run
    opt.perturb(root, (1, 0), 0.05)
    moved, _ = global_loss(session, batch)
    opt.perturb(root, (1, 0), -0.05)
    back, _ = global_loss(session, batch)
    assert abs(moved - base) > 1e-4, (base, moved)
    assert abs(back - base) < 1e-6, (base, back)  # restored (to the bit, but for rare binade crossings)


def communication() -> None:
    """During MeZO steps, beyond the forward's parameter all-gathers only scalars are all-reduced."""
    session, batch = session_and_batch()
    opt = build_optimizer(session.cfg.zo, session.backend.shards(), 0)
    calls: list[tuple[str, int]] = []
    wrapped = {}
    names = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
             "reduce_scatter_single", "broadcast", "all_to_all_single", "send", "recv", "reduce", "gather",
             "scatter", "all_reduce_coalesced")
    for name in [n for n in names if hasattr(dist, n)]:
        original = getattr(dist, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
            calls.append((_name, tensor.numel() if isinstance(tensor, torch.Tensor) else -1))
            return _original(*args, **kwargs)

        wrapped[name] = original
        setattr(dist, name, spy)
    try:
        for step in range(2):
            opt.step(lambda: global_loss(session, batch)[0], step)
    finally:
        for name, original in wrapped.items():
            setattr(dist, name, original)
    parameter_gathers = ("all_gather_into_tensor", "all_gather_single")  # FSDP2's, by torch version
    other = [c for c in calls if c[0] not in parameter_gathers]
    gathers = [c for c in calls if c[0] in parameter_gathers]
    assert gathers, "no parameter all-gathers seen: the spy is not wired to FSDP2's collectives"
    assert all(name == "all_reduce" and numel <= 2 for name, numel in other), other
    assert len(other) == 4, other  # one [loss, correct] pair per forward, two forwards per step


if __name__ == "__main__":
    try:
        {"root_trap": root_trap, "communication": communication}[sys.argv[1]]()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
