"""ZO optimizers, one file each. `build_optimizer` is the only place that maps names to classes."""

from __future__ import annotations

import importlib

from zofsdp.optim.base import LossFn, ZOOptimizer

OPTIMIZERS = {
    "mezo": "zofsdp.optim.mezo:MeZO",
}


def build_optimizer(cfg, shards, seed: int, device="cpu") -> ZOOptimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"zo.optimizer: unknown {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    module, cls = OPTIMIZERS[cfg.optimizer].split(":")
    return getattr(importlib.import_module(module), cls)(shards, cfg, seed, device)


__all__ = ["LossFn", "OPTIMIZERS", "ZOOptimizer", "build_optimizer"]
