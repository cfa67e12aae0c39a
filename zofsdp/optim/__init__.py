"""ZO optimizers, one file each. `build_optimizer` is the only place that maps names to classes."""

from __future__ import annotations

import importlib

from zofsdp.optim.base import LossFn, ZOOptimizer

OPTIMIZERS = {
    "mezo": "zofsdp.optim.mezo:MeZO",
    "curvzo": "zofsdp.optim.curvzo:CurvZO",
    "adalezo": "zofsdp.optim.adalezo:AdaLeZO",
}


def build_optimizer(cfg, shards, seed: int, device="cpu", blocks=None) -> ZOOptimizer:
    """`blocks`: the backend's full (name, full numel, group) list; sparse samplers need it when sharded."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"zo.optimizer: unknown {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    module, cls = OPTIMIZERS[cfg.optimizer].split(":")
    return getattr(importlib.import_module(module), cls)(shards, cfg, seed, device, blocks=blocks)


__all__ = ["LossFn", "OPTIMIZERS", "ZOOptimizer", "build_optimizer"]
