"""MeZO / ZO-SGD (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023).

Estimator: with z ~ N(0, I) and ℓ± = L(θ ± εz), the projected gradient g = (ℓ₊ − ℓ₋)/(2ε) gives
ĝ = g·z, an unbiased estimate of ∇L up to O(ε²). Update θ ← θ − η(ĝ + λθ), λ only on weight matrices.

Three passes over the shards per step instead of the reference code's four: +εz, −2εz, then the restore
and the update in one pass (each chunk of z generated once). z is never stored: each pass regenerates it
from the shared seed.
"""

from __future__ import annotations

from zofsdp.optim.base import LossFn, ZOOptimizer


class MeZO(ZOOptimizer):
    def step(self, loss_fn: LossFn, step: int) -> dict:
        eps, key = self.cfg.eps, (step, 0)
        names = [name for name, _, _ in self.blocks]  # every tensor, owned rows or not
        self.perturb(self.shards, key, +eps, names)
        loss_plus = loss_fn()
        self.perturb(self.shards, key, -2 * eps, names)
        loss_minus = loss_fn()
        g = (loss_plus - loss_minus) / (2 * eps)
        if not self.finite(loss_plus, loss_minus):
            self.perturb(self.shards, key, +eps, names)  # restore only; the trainer counts the skip
            return {"loss": float("nan"), "projected_grad": float("nan"), "forward_passes": 2, "skipped": True}
        self.restore_and_update(self.shards, key, eps, g)
        return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": g, "forward_passes": 2,
                "keep_fraction": 1.0}
