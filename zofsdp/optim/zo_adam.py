"""ZO-Adam / MeZO-Adam: torch.optim.Adam's update on MeZO's two-sided estimate (the baseline of the MeZO
paper, Malladi et al., NeurIPS 2023, and of the BSZO, HiZOO and LOREN papers; the same code in all three
public repositories: AeonianQuill/BSZO trainer.py zo_step, hseung88/loren glue_transformer_adam.py,
ZO-Bench zo-bench/trainer.py).

Estimator: with ℓ± = L(θ ± εz), ĝ = (ℓ₊ − ℓ₋)/(2ε)·z (unbiased for ∇L up to O(ε²)), then Adam with bias
correction, exactly torch's single-tensor step (amsgrad off, no L2 term):
    m ← β1·m + (1−β1)·ĝ ;  v ← β2·v + (1−β2)·ĝ² ;  θ ← θ − (η/(1−β1^t))·m / (√v/√(1−β2^t) + ε_adam)
The first step is ≈ −η·sign(ĝ) per element, whatever |ĝ|: its learning rates sit ~100x below MeZO's.
zo.weight_decay is our decoupled decay on weight matrices (θ ← θ(1 − ηλ) first, as AdamW), not torch
Adam's L2 term; every public script runs with 0.

State: m and v in fp32 (the public code keeps them in the model dtype; fp16 overflows ĝ², and the BSZO
paper dropped ZO-Adam on fp16 Mistral for it), one pair per shard, sharded exactly like the parameters and
never gathered: 8·P/N bytes per rank on top of MeZO. No extra communication: ĝ's scalar is all-reduced,
z is regenerated, and the update is per element.
"""

from __future__ import annotations

import math

import torch

from zofsdp.noise import LOW_PRECISION, Shard, round_to, sr_key
from zofsdp.optim.base import LossFn, ZOOptimizer


class ZOAdam(ZOOptimizer):
    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", **kw):
        super().__init__(shards, cfg, seed, device, **kw)
        self.c = cfg.zo_adam
        # zeros_like: on the shard's device, and fake where the shards are (zofsdp memory --simulate)
        self.exp_avg = [torch.zeros_like(s.data, dtype=torch.float32) for s in shards]
        self.exp_avg_sq = [torch.zeros_like(s.data, dtype=torch.float32) for s in shards]
        self.num_updates = 0
        """t of the bias correction: steps whose update was applied (skipped steps do not count)."""

    def step(self, loss_fn: LossFn, step: int) -> dict:
        eps, key = self.cfg.eps, (step, 0)
        names = [name for name, _, _ in self.blocks]
        self.perturb(self.shards, key, +eps, names)
        loss_plus = loss_fn()
        self.perturb(self.shards, key, -2 * eps, names)
        loss_minus = loss_fn()
        if not self.finite(loss_plus, loss_minus):
            self.perturb(self.shards, key, +eps, names)
            return {"loss": float("nan"), "projected_grad": float("nan"), "forward_passes": 2, "skipped": True}
        g = (loss_plus - loss_minus) / (2 * eps)
        restore = eps
        if self.probe is not None:  # low-precision shards were never perturbed: end the probe only
            self.probe.shift(self.probe.names, key, eps)
            restore = 0.0
        self.num_updates += 1
        self.adam_pass(key, restore, g)
        return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": g, "forward_passes": 2}

    def adam_pass(self, key: tuple[int, ...], restore: float, g: float) -> None:
        """One noise pass: undo the probe, then Adam on ĝ = g·z, chunk by chunk (chunk-sized temporaries)."""
        lr, wd, b1, b2 = self.cfg.lr, self.cfg.weight_decay, self.c.beta1, self.c.beta2
        t = self.num_updates
        step_size = lr / (1 - b1**t)
        bias2_sqrt = math.sqrt(1 - b2**t)

        def apply(lane, i: int, view: torch.Tensor, z: torch.Tensor) -> None:
            shard = self.shards[i]
            lo = view.storage_offset() - shard.data.storage_offset()
            m, v = self.exp_avg[i][lo : lo + view.numel()], self.exp_avg_sq[i][lo : lo + view.numel()]
            x = view.float() if view.dtype in LOW_PRECISION else view
            if restore:
                x.add_(lane.step(z, restore))
            if wd and shard.decay:
                x.mul_(1 - lr * wd)
            grad = z * g
            m.lerp_(grad, 1 - b1)  # torch's _single_tensor_adam, op for op
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.c.adam_eps)
            x.addcdiv_(m, denom, value=-step_size)
            if x is not view:  # bf16/fp16 storage: one stochastic rounding of the fp32 result
                start = shard.global_start + lo
                view.copy_(round_to(x, view.dtype, sr_key(self.seed, (*key, shard.block_id)), start,
                                    self.noise.rounding))

        self.noise._run(self.shards, key, apply)

    def state_shards(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """(name, local fp32 view, global flat start, full numel) of every moment shard, named
        `zo_adam.exp_avg.<param>` / `zo_adam.exp_avg_sq.<param>`: the layout `Backend.local_params()` has,
        so a sharded checkpoint can write and read them like the weights."""
        out = []
        for kind, tensors in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            out += [(f"zo_adam.{kind}.{s.name}", t, s.global_start, s.full_numel) for s, t in zip(self.shards, tensors)]
        return out

    def state_dict(self) -> dict:
        """The small state (t); the moments are parameter-sized and sharded: see `state_shards`."""
        return {"optimizer": "zo_adam", "num_updates": self.num_updates, "sharded_state": ["exp_avg", "exp_avg_sq"]}

    def load_state_dict(self, state: dict) -> None:
        """Restores t. The moments must be restored into `state_shards()` by the caller first and
        `state["sharded_state_loaded"]` set; a checkpoint without them cannot resume ZO-Adam exactly."""
        if state.get("optimizer") != "zo_adam":
            raise ValueError(f"the checkpoint's optimizer state is {state.get('optimizer') or 'MeZO'}'s, "
                             "not zo_adam's: resume with the zo.optimizer that wrote it")
        if state["num_updates"] and not state.get("sharded_state_loaded"):
            raise ValueError("zo_adam's moments (8 bytes per parameter, sharded) are not in this checkpoint: "
                             "it cannot be resumed exactly; start afresh or use a checkpoint that holds them")
        self.num_updates = int(state["num_updates"])
