"""Backends: `none` (one process), `fsdp2` (PyTorch FSDP2), `deepspeed` (ZeRO-3)."""

from __future__ import annotations

from zofsdp.parallel.base import Backend


def build_backend(name: str, **kwargs) -> Backend:
    if name == "none":
        from zofsdp.parallel.none import NoneBackend

        return NoneBackend(kwargs.get("cfg"))
    if name == "fsdp2":
        from zofsdp.parallel.fsdp2 import FSDP2Backend

        return FSDP2Backend(kwargs.get("cfg"))
    if name == "deepspeed":
        from zofsdp.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(**kwargs)
    raise ValueError(f"parallel.backend must be one of none, fsdp2, deepspeed; got {name!r}")
