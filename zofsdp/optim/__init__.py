"""ZO optimizers, one file each. `build_optimizer` is the only place that maps names to classes."""

from __future__ import annotations

import importlib

from zofsdp.optim.base import LossFn, ZOOptimizer

OPTIMIZERS = {
    "mezo": "zofsdp.optim.mezo:MeZO",
    "curvzo": "zofsdp.optim.curvzo:CurvZO",
    "adalezo": "zofsdp.optim.adalezo:AdaLeZO",
    "bszo": "zofsdp.optim.bszo:BSZO",
    "bszo_b": "zofsdp.optim.bszo:BSZO_B",
    "zo_adam": "zofsdp.optim.zo_adam:ZOAdam",
    "hizoo": "zofsdp.optim.hizoo:HiZOO",
}


def build_optimizer(cfg, shards, seed: int, device="cpu", blocks=None, probe=None,
                    rounding: str = "stochastic") -> ZOOptimizer:
    """`blocks`: the backend's full (name, full numel, group) list; sparse samplers need it when sharded.
    `probe`: the backend's (`Backend.probe`), needed when the shards are bf16/fp16; `rounding` of their
    updates (model.update_rounding)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"zo.optimizer: unknown {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    module, cls = OPTIMIZERS[cfg.optimizer].split(":")
    return getattr(importlib.import_module(module), cls)(
        shards, cfg, seed, device, blocks=blocks, probe=probe, rounding=rounding)


__all__ = ["LossFn", "OPTIMIZERS", "ZOOptimizer", "build_optimizer"]
