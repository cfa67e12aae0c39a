"""Perturb the gathered parameters, not the shards: the probe of bf16/fp16-shard and mixed-precision training.

In bf16 or fp16, +εz, −2εz, +εz applied in place does not give the weights back (45.7 % of bf16 weights
moved after one cycle, a random walk as large as the updates; docs/memory.md, "Precision modes"), and even
fp32 shards lose a last bit where a step crosses a power of two. So with a probe (model.perturb resolved to
`gathered`: the default for bf16/fp16 shards and for mixed precision) the optimizer never writes a probe
into the shards. It only records which perturbation the next forwards must see (`Probe.shift`), and the
backend's forward pre-hooks add it to the parameters as the forward uses them:
- FSDP2: the unsharded (all-gathered) parameters of each FSDP unit, after FSDP2's own pre-forward hook
  has gathered them. They are a temporary copy, freed after the unit (reshard_after_forward), so the
  perturbation costs no memory and disappears with them.
- DeepSpeed: each module's gathered parameters, after ZeRO-3's fetch hook (zofsdp.parallel.precision).
- one process (`none`): there is no gathered copy, so each leaf module's parameters are swapped for a
  perturbed copy during its forward and swapped back after it: one tensor's copy at a time.
The update pass then writes the shards once (bf16/fp16: with stochastic rounding, zofsdp.noise.round_to).

The same z as the in-place path: z of a whole tensor is the concatenation of its shards' z (global flat
indices), so the forward sees bf16(θ + d(εz)) whatever the layout. The price is noise: every rank generates
z for every tensor it gathers, twice per step (the forwards), where in-place probes touch 1/ws of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from zofsdp.noise import Noise, Shard, block_id


class Probe:
    """The perturbation scale·z(key) that the forwards must currently see, on tensors named in `names`."""

    def __init__(self) -> None:
        self.noise: Noise | None = None
        self.key: tuple[int, ...] = ()
        self.scale = 0.0
        self.names: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return self.scale != 0.0

    def shift(self, names: Iterable[str], key: tuple[int, ...], scale: float) -> None:
        """Move the perturbation by scale·z: +ε, then −2ε, then +ε brings it back to exactly 0."""
        names = frozenset(names)
        if self.active and (key != self.key or names != self.names):
            raise RuntimeError(f"probe {self.key} is still active when {key} starts: restore it first")
        self.key, self.names = key, names
        self.scale += scale  # ε − 2ε + ε is exactly 0 in floating point (the scales are ±ε, ±2ε)
        if not self.scale:
            self.names = frozenset()

    @torch.no_grad()
    def apply(self, name: str, tensor: torch.Tensor) -> None:
        """tensor += d(scale·z) on the whole (gathered) tensor `name`, if it is perturbed now."""
        if not self.active or name not in self.names:
            return
        if self.noise is None:
            raise RuntimeError("the probe has no noise: the optimizer must be built with it")
        shard = Shard(name, tensor.view(-1), 0, tensor.numel(), block_id(name), False, "")
        self.noise.add_([shard], self.key, self.scale)
