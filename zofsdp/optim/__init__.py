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
    "loren": "zofsdp.optim.loren:Loren",
    "dizo": "zofsdp.optim.dizo:DiZO",
}


def build_optimizer(cfg, shards, seed: int, device="cpu", blocks=None, probe=None,
                    rounding: str = "stochastic", all_reduce=None, shapes=None) -> ZOOptimizer:
    """`blocks`: the backend's full (name, full numel, group) list; sparse samplers need it when sharded.
    `probe`: the backend's (`Backend.probe`), needed when the shards are bf16/fp16; `rounding` of their
    updates (model.update_rounding). `all_reduce`: the backend's `all_reduce_sum` (None: one process);
    `shapes`: name -> full shape (`param_shapes(backend)`), read by optimizers that need rows (LOREN)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"zo.optimizer: unknown {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    module, cls = OPTIMIZERS[cfg.optimizer].split(":")
    extra = {"shapes": shapes} if cfg.optimizer in NEEDS_SHAPES else {}
    return getattr(importlib.import_module(module), cls)(
        shards, cfg, seed, device, blocks=blocks, probe=probe, rounding=rounding, all_reduce=all_reduce, **extra)


NEEDS_SHAPES = {"loren"}


def param_shapes(backend) -> dict[str, tuple[int, ...]] | None:
    """name -> full shape of every parameter of a backend's model (FSDP2's DTensors report the global
    shape, DeepSpeed's parameters `ds_shape`); None before the model is wrapped."""
    model = getattr(backend, "model", None) or getattr(getattr(backend, "engine", None), "module", None)
    if model is None:
        return None
    return {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in model.named_parameters()}


__all__ = ["OPTIMIZERS", "LossFn", "ZOOptimizer", "build_optimizer", "param_shapes"]
