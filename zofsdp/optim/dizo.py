"""DiZO: MeZO plus a periodic per-tensor projection toward the pre-trained weights (Tan et al., "Harmony in
Divergence: Towards Fast, Accurate, and Memory-efficient Zeroth-order LLM Fine-tuning", arXiv 2502.03304;
code Skilteee/DiZO@b05e73d, large_models/trainer.py; OPTIMIZERS-NEXT.md section 5).

Every step is MeZO's. After the update of every `interval`-th step, for the projected tensors i (K and V
weights by default) with anchor θ0 (their pre-trained values) and distance t_i = ‖θ_i − θ0_i‖:
    γ_i ← t_i; for `search_iters` iterations, each on a training batch of its own:
        z_i ~ N(0, 1) clipped to ±(τ/ε_p)·t_i;  ℓ± = L(θ with γ_i ± ε_p·z_i);  gr = (ℓ₊ − ℓ₋)/(2ε_p)
        γ_i ← clip(γ_i − η_p·t_i·gr·z_i, (1 − τ)t_i, (1 + τ)t_i)
    then θ_i ← θ0_i + (θ_i − θ0_i)·γ_i/(t_i + 1e-8)        ("θ with γ" means this map, as a probe)
so each tensor's distance to its anchor becomes γ_i (up to the 1e-8). 2 + 2·search_iters forwards then.
As the code: t is computed once per round (the code recomputes it from the restored θ, the same up to
rounding), a probe is undone by the inverse map (inexact by an ulp here and there, like the code's; replay
re-runs the same probes, so it keeps those ulps), z is a scalar per tensor, and γ starts at t every round.

Sharding: θ0 is a copy of this rank's shards of the projected tensors, sharded exactly like θ and never
gathered (P_proj/N × dtype bytes). t needs the one all-reduce of the rank-local squared distances (one
float64 per projected tensor, per round); the map is per element with a per-tensor scalar; γ and z are
host floats computed from the all-reduced losses and the seed, identical on every rank. The search's
batches are `loss_fn(batch=k)`, k = 1..search_iters, drawn by the trainer from (seed, step, k).
The final factors γ_i/(t_i + 1e-8) go to the seed log (`decide`): replay applies the run's own factors.
Needs fp32 shards (in-place probes; model.compute_dtype may be bf16).
"""

from __future__ import annotations

import math

import torch

from zofsdp.noise import Shard, mix_seed
from zofsdp.optim.base import LossFn, decide
from zofsdp.optim.mezo import MeZO

SEARCH_TAG = 0x44695A4F  # "DiZO": the γ search's noise stream, apart from the weights' z


class DiZO(MeZO):
    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", probe=None, **kw):
        if probe is not None:
            raise ValueError("zo.optimizer=dizo scales the projected tensors in place around their anchor: it needs "
                             "fp32 shards perturbed in place (model.dtype=float32; model.perturb=shards with bf16 compute)")
        super().__init__(shards, cfg, seed, device, **kw)
        self.c = cfg.dizo
        self.targets = [n for n, _, _ in self.blocks if any(t in n for t in self.c.targets)]
        """Every projected tensor, in the same order on every rank (owned rows or not)."""
        if not self.targets:
            raise ValueError(f"zo.dizo.targets={self.c.targets} matches no parameter name")
        index = {n: j for j, n in enumerate(self.targets)}
        self.local = [(i, index[s.name]) for i, s in enumerate(shards) if s.name in index]
        self.anchor = {i: shards[i].data.clone() for i, _ in self.local}  # fake when simulated
        """θ0: this rank's shards of the projected tensors at the start, in the shards' dtype."""

    def step(self, loss_fn: LossFn, step: int) -> dict:
        record = super().step(loss_fn, step)
        if step % self.c.interval:
            return record
        factors, gamma, t, forwards = self.search(loss_fn, step)
        factors = decide(loss_fn, factors)  # replay hands back the run's own
        self.scale(factors)
        return {**record, "forward_passes": record["forward_passes"] + forwards,
                "projection_distance": math.sqrt(sum(x * x for x in t)),
                "projection_ratio": sum(gamma) / max(sum(t), 1e-30)}

    def distances(self) -> list[float]:
        """t_i = ‖θ_i − θ0_i‖ over every rank's rows: one all-reduce of the local squared sums (float64)."""
        local = torch.zeros(len(self.targets), dtype=torch.float64, device=self.noise.device)
        for i, j in self.local:
            for view, anchor in self.chunks(i):
                local[j] += (view.double() - anchor.double()).square().sum()
        return self.all_reduce(local).sqrt().tolist()

    def search(self, loss_fn: LossFn, step: int) -> tuple[list[float], list[float], list[float], int]:
        """The ZO search of γ (module docstring): (final factors, γ, t, forwards)."""
        c, t = self.c, self.distances()
        gamma, forwards = list(t), 0
        gen = torch.Generator().manual_seed(mix_seed(self.seed, step, SEARCH_TAG))
        for k in range(1, c.search_iters + 1):
            z = torch.randn(len(t), generator=gen, dtype=torch.float64).tolist()
            z = [min(max(zi, -c.radius / c.probe_eps * ti), c.radius / c.probe_eps * ti) for zi, ti in zip(z, t)]
            batch = k if c.new_batches else 0
            losses = []
            for sign in (+1, -1):
                f = [(g + sign * c.probe_eps * zi) / (ti + 1e-8) if ti else 1.0 for g, zi, ti in zip(gamma, z, t)]
                self.scale(f)
                losses.append(loss_fn(batch=batch) if batch else loss_fn())
                self.scale(f, undo=True)
            forwards += 2
            if not self.finite(*losses):
                continue  # a non-finite probe leaves γ where it is
            gr = (losses[0] - losses[1]) / (2 * c.probe_eps)
            gamma = [min(max(g - c.proj_lr * ti * gr * zi, (1 - c.radius) * ti), (1 + c.radius) * ti)
                     for g, zi, ti in zip(gamma, z, t)]
        factors = [g / (ti + 1e-8) if ti else 1.0 for g, ti in zip(gamma, t)]
        return factors, gamma, t, forwards

    def scale(self, factors: list[float], undo: bool = False) -> None:
        """θ_i ← θ0_i + (θ_i − θ0_i)·f_i in place, chunk by chunk (no shard-sized temporary); `undo`
        divides by f_i instead (a probe's undo, as the code)."""
        for i, j in self.local:
            for view, anchor in self.chunks(i):
                view.sub_(anchor)
                if undo:
                    view.div_(factors[j])
                else:
                    view.mul_(factors[j])
                view.add_(anchor)

    def chunks(self, i: int):
        data, anchor, n = self.shards[i].data, self.anchor[i], self.cfg.chunk_numel
        for lo in range(0, data.numel(), n):
            yield data[lo : lo + n], anchor[lo : lo + n]

    def state_shards(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """(name, local anchor view, global flat start, full numel), named `dizo.anchor.<param>`: the layout
        of `Backend.local_params()`, so a sharded checkpoint holds θ0 like the weights."""
        return [(f"dizo.anchor.{self.shards[i].name}", self.anchor[i], self.shards[i].global_start,
                 self.shards[i].full_numel) for i, _ in self.local]

    def state_dict(self) -> dict:
        return {"optimizer": "dizo", "sharded_state": ["anchor"], "targets": self.targets}

    def load_state_dict(self, state: dict) -> None:
        """θ0 must have been read into `state_shards()` by the caller (`sharded_state_loaded`): a resumed
        run's weights are not the pre-trained ones, so without it the anchor would be wrong."""
        if state.get("optimizer") != "dizo":
            raise ValueError(f"the checkpoint's optimizer state is {state.get('optimizer') or 'MeZO'}'s, "
                             "not dizo's: resume with the zo.optimizer that wrote it")
        if state.get("targets") != self.targets:
            raise ValueError("the checkpoint's dizo projects other tensors (zo.dizo.targets or the model changed)")
        if not state.get("sharded_state_loaded"):
            raise ValueError("dizo's anchor (the pre-trained projected tensors, sharded) is not in this checkpoint: "
                             "it cannot be resumed; start afresh or use a checkpoint that holds it")
