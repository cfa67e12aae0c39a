"""HiZOO: ZO with a diagonal Hessian estimate (Zhao et al., "Second-Order Fine-Tuning without Pain for
LLMs: A Hessian Informed Zeroth-Order Optimizer", arXiv 2402.15173; public code Yanjun-Zhao/HiZOO).

One step, 3 forwards (the public code's 4th forward only logs a loss and is not done here):
    ℓ0 = L(θ), ℓ± = L(θ ± ε·z/√H), ΔL = ℓ₊ + ℓ₋ − 2ℓ0
    Ĥ = estimate of diag(∇²L) (below);  H ← (1 − α)·H + α·Ĥ          (α = hizoo.smooth)
    θ ← θ(1 − ηλ) − η·(ℓ₊ − ℓ₋)/(2ε)·z/√H       with the NEW H (as the code; the probes used the old one)
Estimators (`hizoo.estimator`):
- `paper` (default): Ĥ = |ΔL/(2ε²)·H·(z² − 1)| (the diagonal of the paper's Eq. 8, then Eq. 9's |·|).
  Before the |·| it is unbiased: for L = ½θᵀAθ, ΔL = ε²·xᵀAx with x = z/√H, and
  E[ΔL/(2ε²)·H_j(z_j² − 1)] = A_jj (tests/unit/test_hizoo.py checks it by Monte Carlo).
- `code`: Ĥ = |ΔL|/(2ε²)·H·z² (trainer.py L503-513): no "−1" term, biased: E = (H_j/2)(Σ_i A_ii/H_i +
  2A_jj/H_j), fixed point ≈ ((d+2)/2)·diag(A) for small α.
Numerics (decided, not copied): H in fp32 whatever the model dtype; the EMA is computed as
H += α(Ĥ − H), equal in exact arithmetic, because the code's (1 − α)·H is a no-op in fp32 for α < 6e-8
(float32(1 − 1e-8) == 1: H could only grow); ΔL in float64 (Python floats from the all-reduced losses).
zo.weight_decay follows our rule (weight matrices only); the code decays every tensor, and runs with 0.

Sharding: H is sharded exactly like the parameters (4·P/N bytes per rank, never gathered); z/√H is per
element, and H does not change between the probes, so the restore is exact where MeZO's is. Only the three
losses cross ranks. Needs fp32 shards (model.dtype float32; bf16 compute is fine): the low-precision
probe perturbs gathered copies with plain z and cannot scale by the sharded H.
"""

from __future__ import annotations

import torch

from zofsdp.noise import Shard
from zofsdp.optim.base import LossFn, ZOOptimizer


def diag_estimate(delta_loss: float, hessian: torch.Tensor, z: torch.Tensor, eps: float, form: str) -> torch.Tensor:
    """Ĥ per element before the |·| of the paper's Eq. 9 (the unbiased one for `paper`; the code's form is
    positive already); `delta_loss` = ℓ₊ + ℓ₋ − 2ℓ0."""
    if form == "paper":
        return (hessian * (z * z - 1)).mul_(delta_loss / (2 * eps * eps))
    return (hessian * z * z).mul_(abs(delta_loss) / (2 * eps * eps))


class HiZOO(ZOOptimizer):
    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", probe=None, **kw):
        if probe is not None:
            raise ValueError("zo.optimizer=hizoo perturbs by z/√H with H sharded like the weights: it needs fp32 "
                             "shards (model.dtype=float32; model.compute_dtype=bfloat16 keeps bf16 forwards)")
        super().__init__(shards, cfg, seed, device, **kw)
        self.c = cfg.hizoo
        self.hessian = [torch.ones_like(s.data, dtype=torch.float32) for s in shards]  # fake when simulated
        """H: the diagonal Hessian estimate of each shard's elements (init 1, as the code)."""

    def _local(self, i: int, view: torch.Tensor) -> torch.Tensor:
        lo = view.storage_offset() - self.shards[i].data.storage_offset()
        return self.hessian[i][lo : lo + view.numel()]

    def shift(self, key: tuple[int, ...], scale: float) -> None:
        """θ += d(scale·z/√H): the rounding of noise._Lane.step, so +ε, −2ε, +ε restores the bits."""
        self.noise._run(self.shards, key,
                        lambda lane, i, view, z: view.add_(lane.step(z / self._local(i, view).sqrt(), scale)))

    def step(self, loss_fn: LossFn, step: int) -> dict:
        eps, key = self.cfg.eps, (step, 0)
        base = loss_fn()
        self.shift(key, +eps)
        loss_plus = loss_fn()
        self.shift(key, -2 * eps)
        loss_minus = loss_fn()
        record = {"loss": base, "forward_passes": 3}
        if not self.finite(base, loss_plus, loss_minus):
            self.shift(key, +eps)
            return {**record, "loss": base if self.finite(base) else float("nan"),
                    "projected_grad": float("nan"), "skipped": True}
        g = (loss_plus - loss_minus) / (2 * eps)
        self.update_pass(key, g, loss_plus + loss_minus - 2 * base)
        return {**record, "projected_grad": g, "curvature": (loss_plus + loss_minus - 2 * base) / (eps * eps)}

    def update_pass(self, key: tuple[int, ...], g: float, delta_loss: float) -> None:
        """One pass: restore with the old H, H ← H + α(Ĥ − H), θ ← θ(1 − ηλ) − η·g·z/√H_new."""
        eps, lr, wd, alpha = self.cfg.eps, self.cfg.lr, self.cfg.weight_decay, self.c.smooth

        def apply(lane, i: int, view: torch.Tensor, z: torch.Tensor) -> None:
            h = self._local(i, view)
            view.add_(lane.step(z / h.sqrt(), eps))
            if alpha:
                h.add_(diag_estimate(delta_loss, h, z, eps, self.c.estimator).abs_().sub_(h), alpha=alpha)
            if wd and self.shards[i].decay:
                view.mul_(1 - lr * wd)
            view.add_(z / h.sqrt(), alpha=-lr * g)

        self.noise._run(self.shards, key, apply)

    def state_shards(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """(name, local fp32 H, global flat start, full numel) per shard, named `hizoo.hessian.<param>`:
        the layout of `Backend.local_params()`, for a sharded checkpoint."""
        return [(f"hizoo.hessian.{s.name}", h, s.global_start, s.full_numel) for s, h in zip(self.shards, self.hessian)]

    def state_dict(self) -> dict:
        return {"optimizer": "hizoo", "sharded_state": ["hessian"]}

    def load_state_dict(self, state: dict) -> None:
        """H must have been read into `state_shards()` by the caller (`sharded_state_loaded`)."""
        if state.get("optimizer") != "hizoo":
            raise ValueError(f"the checkpoint's optimizer state is {state.get('optimizer') or 'MeZO'}'s, "
                             "not hizoo's: resume with the zo.optimizer that wrote it")
        if not state.get("sharded_state_loaded"):
            raise ValueError("hizoo's Hessian estimate (4 bytes per parameter, sharded) is not in this checkpoint: "
                             "it cannot be resumed exactly; start afresh or use a checkpoint that holds it")
