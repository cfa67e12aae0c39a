"""BSZO and BSZO-B: Bayesian subspace zeroth-order optimization (Feng & Huang, arXiv 2601.01452, 2026;
public code AeonianQuill/BSZO: bszo_optimizer_v3.py = BSZO, bszo_optimizer_v4.py = BSZO-B).

Estimator. Each step draws k directions z_1..z_k (noise keys (step, i)). With f0 = L(θ) and the one-sided
observations y_i = (L(θ + εz_i) − f0)/ε ≈ z_iᵀ∇L, the latent subspace gradient c ∈ R^k (prior N(0, σ_p²I))
is observed through y = dᵀc + noise, noise ~ N(0, σ_e²‖d‖²). A Kalman filter folds in m observations: the
k axes d = e_i, then m − k adaptive ones on the axis of largest posterior variance j = argmax_i Σ_ii (the
paper's Alg. 1; the code's top eigenvector of Σ is the same axis, since axis observations keep Σ diagonal,
except on ties, which argmax breaks toward the first axis on every rank alike). BSZO re-uses y_j for the
adaptive observation (cached: k + 1 forwards per step); BSZO-B spends a fresh forward on L(θ + εz_j)
(k + 2 at m = k + 1). The update is θ ← θ − η Σ_i μ_i z_i with μ the posterior mean: for axis
observations and fixed σ_e, μ_i = γ_i y_i with γ = σ_p²/(σ_p² + σ_e²) (Cor. 3.6), so E[Δθ] = −ηγk∇L + O(ε).

Residual-adaptive noise (the code, every observation, before the gain): r = (y − dᵀμ)/‖d‖,
ema ← (1 − α)·ema + α·r², σ_e = max(floor·σ_e,init, √ema); `ema` persists across steps (init σ_e,init²).
σ_p = σ_e,init = √(n/10⁶) with n the number of trainable parameters ("auto" in the code).

Sharding: the filter is k-dimensional float64 host arithmetic on all-reduced losses, identical on every
rank; nothing but the m' + 1 losses crosses ranks. No weight decay in the paper; zo.weight_decay is applied
once per step (with the first direction's update) when set.
"""

from __future__ import annotations

import math

import torch

from zofsdp.noise import Shard
from zofsdp.optim.base import LossFn, ZOOptimizer

MIN_COEFF = 1e-10
"""Directions whose posterior mean is below this are not applied (the code's skip, saves a noise pass)."""


class SubspaceKalman:
    """Posterior N(μ, Σ) of the k-dim subspace gradient, updated one linear observation y ≈ dᵀc at a time."""

    def __init__(self, k: int, prior_var: float, jitter: float = 1e-10):
        self.mean = torch.zeros(k, dtype=torch.float64)
        self.cov = prior_var * torch.eye(k, dtype=torch.float64)
        self.jitter = jitter

    def residual(self, d: torch.Tensor, y: float) -> float:
        """(y − dᵀμ)/‖d‖: the innovation per unit direction length (feeds the noise estimate)."""
        return (y - float(d @ self.mean)) / float(d.norm())

    def update(self, d: torch.Tensor, y: float, noise_var: float) -> None:
        """Fold in y = dᵀc + e, e ~ N(0, noise_var·‖d‖²); Joseph-free form, symmetrised as the code does."""
        cov_d = self.cov @ d
        gain = cov_d / (float(d @ cov_d) + noise_var * float(d @ d))
        self.mean = self.mean + gain * (y - float(d @ self.mean))
        cov = self.cov - torch.outer(gain, cov_d)
        self.cov = (cov + cov.T) / 2 + self.jitter * torch.eye(len(d), dtype=torch.float64)

    def adaptive_axis(self) -> int:
        """argmax_i Σ_ii, ties to the smallest index (a rule that cannot differ between ranks)."""
        diag = self.cov.diagonal().tolist()
        return diag.index(max(diag))


class BSZO(ZOOptimizer):
    refresh = False
    """BSZO-B spends a forward on the adaptive observation instead of re-using the cached one."""

    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", **kw):
        super().__init__(shards, cfg, seed, device, **kw)
        self.c = cfg.bszo
        n = sum(numel for _, numel, _ in self.blocks)
        auto = math.sqrt(n / 1e6)
        self.prior_std = self.c.prior_std or auto
        self.noise_std_init = self.c.noise_std_init or auto
        self.residual_sq_ema = self.noise_std_init**2
        """Persists across steps (the code: "keep noise estimate across batches")."""

    def noise_var(self, residual: float) -> float:
        """σ_e² after the residual-adaptive update (the code updates before computing the gain)."""
        if not self.c.adaptive_noise:
            return self.noise_std_init**2
        a = self.c.noise_ema
        self.residual_sq_ema = (1 - a) * self.residual_sq_ema + a * residual**2
        std = max(self.c.noise_floor * self.noise_std_init, math.sqrt(self.residual_sq_ema))
        return std * std

    def observe(self, kalman: SubspaceKalman, axis: int, y: float) -> None:
        d = torch.zeros(self.c.subspace_dim, dtype=torch.float64)
        d[axis] = 1.0
        kalman.update(d, y, self.noise_var(kalman.residual(d, y)))

    def one_sided(self, loss_fn: LossFn, names: list[str], axis: int, step: int, base: float,
              restore: bool = True) -> float:
        """y = (L(θ + εz_axis) − f0)/ε; the probe is undone unless the caller fuses it with the update."""
        eps, key = self.cfg.eps, (step, axis)
        self.perturb(self.shards, key, +eps, names)
        loss = loss_fn()
        if restore:
            self.perturb(self.shards, key, -eps, names)
        return (loss - base) / eps

    def step(self, loss_fn: LossFn, step: int) -> dict:
        k, m = self.c.subspace_dim, self.c.num_samples
        names = [name for name, _, _ in self.blocks]
        base = loss_fn()
        ys = [self.one_sided(loss_fn, names, i, step, base, restore=i < k - 1) for i in range(k)]
        record = {"loss": base, "projected_grad": ys[0], "forward_passes": 1 + k}
        if not self.finite(base, *ys):
            self.perturb(self.shards, (step, k - 1), -self.cfg.eps, names)  # undo the last probe only
            return {**record, "loss": float("nan") if not self.finite(base) else base, "skipped": True}
        kalman = SubspaceKalman(k, self.prior_std**2)
        for i, y in enumerate(ys):
            self.observe(kalman, i, y)
        last_open = True  # the last probe is still applied: undone in the pass of its own update
        for _ in range(m - k):
            j = kalman.adaptive_axis()
            if self.refresh:
                if last_open:
                    self.perturb(self.shards, (step, k - 1), -self.cfg.eps, names)
                    last_open = False
                y = self.one_sided(loss_fn, names, j, step, base)
                record["forward_passes"] += 1
                if not self.finite(y):
                    return {**record, "skipped": True}
            else:
                y = ys[j]
            self.observe(kalman, j, y)
        self.apply_update(kalman.mean.tolist(), step, names, last_open)
        return {**record, "posterior_mean_norm": float(kalman.mean.norm()),
                "noise_std": math.sqrt(self.residual_sq_ema)}

    def apply_update(self, mean: list[float], step: int, names: list[str], last_open: bool) -> None:
        """θ ← θ − η Σ_i μ_i z_i, one pass per direction; the open probe's restore rides on its direction's."""
        lr, wd, k = self.cfg.lr, self.cfg.weight_decay, len(mean)
        for i in reversed(range(k)):  # the open probe is the last direction's: its pass comes first
            restore = -self.cfg.eps if (last_open and i == k - 1) else 0.0
            decays = [1.0 - lr * wd if s.decay and wd and i == 0 else 1.0 for s in self.shards]
            update = -lr * mean[i] if abs(mean[i]) > MIN_COEFF else 0.0
            if not restore and not update and all(x == 1.0 for x in decays):
                continue
            self.write(step, i, restore, update, decays, names)

    def write(self, step: int, i: int, restore: float, update: float, decays: list[float],
              names: list[str]) -> None:
        key = (step, i)
        if self.probe is not None:  # low-precision shards were never perturbed: end the probe, update only
            self.probe.shift(names if restore else self.probe.names, key, restore)
            restore = 0.0
        self.noise.restore_update_(self.shards, key, restore, [update] * len(self.shards), decays)

    def state_dict(self) -> dict:
        """The only state that outlives a step: the residual EMA behind σ_e (μ, Σ are reset each step)."""
        return {"optimizer": type(self).__name__.lower(), "residual_sq_ema": self.residual_sq_ema}

    def load_state_dict(self, state: dict) -> None:
        mine = type(self).__name__.lower()
        if state.get("optimizer") != mine:
            raise ValueError(f"the checkpoint's optimizer state is {state.get('optimizer') or 'MeZO'}'s, "
                             f"not {mine}'s: resume with the zo.optimizer that wrote it")
        self.residual_sq_ema = float(state["residual_sq_ema"])


class BSZO_B(BSZO):
    """BSZO-B: the adaptive observation is a fresh forward (k + 2 forwards per step at m = k + 1)."""

    refresh = True
