"""CurvZO: curvature-guided sparse ZO (Wang, Chen, Tang, "CurvZO: Adaptive Curvature-Guided Sparse
Zeroth-Order Optimization for Efficient LLM Fine-Tuning", arXiv 2603.21725, 2026), block-wise variant.

Estimator. Each block b (one parameter tensor, or one layer with `granularity: layer`) is kept with
probability π_b, m_b ~ Bernoulli(π_b), independently, from a generator seeded by (run seed, step): every
rank draws the same mask. With u = m ⊙ z and ℓ± = L(θ ± εu), Δ = (ℓ₊ − ℓ₋)/(2ε) and the Horvitz–Thompson
estimate is ĝ_b = Δ·m_b·z_b/π_b, so E[ĝ] = ∇L up to O(ε²). Only kept blocks are perturbed or updated:
unkept blocks generate no noise and are never written, in any of the three passes (+εu, −2εu, restore and
update fused as in MeZO).

Sampling rule. Minimising Σ_b F_b/π_b under Σ_b n_b·π_b = B·d gives π_b ∝ √S_b; we scale to the budget and
clip to [π_min, 1] by water-filling (`sampling.budgeted_probs`).

Details the paper leaves open, and what we chose (docs/optimizers.md has the longer reasoning):
- Score. s_b = Δ²·mean_{i∈b}(v_i²), v = z/π_b the HT-scaled direction, taken on kept blocks only. We use
  E[mean z_i²] = 1, so s_b = Δ²/π_b² (`score_scaling: ht`, the paper's v). Computing the sample mean of z²
  would cost a noise pass and an all-reduce of one scalar per block; for blocks of ≥ 10⁴ elements it is
  within 1–2 % of 1 anyway. `score_scaling: none` uses s_b = Δ² (the conditional second moment that the
  variance formula Σ F_b/π_b actually contains; it focuses harder).
- Smoothing. F_b ← ema·F_b + (1−ema)·s_b when b is kept; the first time b is kept F_b = s_b (no bias toward
  the zero start); blocks never kept yet borrow the mean of the others. S = F/ΣF.
- Unkept blocks: F_b ← F_b + unkept_decay·(mean F − F_b). A stale low score can only be refreshed when
  π_min lets the block through; the pull toward the mean bounds how long that can take. Default 0.01:
  half-life ~70 steps, longer than the 1/π_min = 20-step typical revisit, so it only touches stale blocks.
- Adaptive budget (the paper's Eq. 20 is not in our sources). With r = d_eff/G (participation ratio of S
  over the number of blocks) and H the normalised entropy of S, both in (0, 1] and 1 for flat scores,
  flatness φ = (r + H)/2 and target B* = B_min + (B_max − B_min)·φ: concentrated scores shrink the budget
  (focus), flat scores grow it (explore). The budget follows B ← budget_ema·B + (1−budget_ema)·B*,
  clipped to [B_min, B_max], so one noisy Δ² cannot swing it.
"""

from __future__ import annotations

import torch

from zofsdp.noise import Shard
from zofsdp.optim.base import LossFn, ZOOptimizer
from zofsdp.optim.sampling import BlockSpec, budgeted_probs, build_units, concentration, generator

MASK_TAG = 0xC0_2F  # mixes into the mask generator's seed so masks never reuse the noise's streams


class CurvZO(ZOOptimizer):
    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", blocks: list[BlockSpec] | None = None,
                 **precision):
        super().__init__(shards, cfg, seed, device, blocks=blocks, **precision)
        self.c = cfg.curvzo
        self.units = build_units(self.blocks, self.c.granularity)
        num = len(self.units.names)
        self.second_moment = torch.zeros(num, dtype=torch.float64)
        """F_b: EMA of the per-coordinate score while b was kept (0 until first kept)."""
        self.num_kept = torch.zeros(num, dtype=torch.int64)
        self.budget = self.c.budget_init

    # ------------------------------------------------------------------ decisions (identical on all ranks)
    def scores(self) -> torch.Tensor:
        """S: normalised scores; blocks never kept borrow the mean of the others (uniform at the start)."""
        f = self.second_moment.clone()
        seen = self.num_kept > 0
        if not bool(seen.any()) or float(f[seen].sum()) <= 0:
            return torch.full_like(f, 1.0 / f.numel())
        f[~seen] = f[seen].mean()
        return f / f.sum()

    def keep_probs(self) -> torch.Tensor:
        return budgeted_probs(self.scores().sqrt(), self.units.sizes, self.budget, self.c.pi_min)

    def draw_mask(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        u = torch.rand(probs.numel(), dtype=torch.float64, generator=generator(self.seed, step, MASK_TAG))
        return u < probs

    def update_scores(self, keep: torch.Tensor, probs: torch.Tensor, projected_grad: float) -> None:
        scale = probs.square() if self.c.score_scaling == "ht" else torch.ones_like(probs)
        score = projected_grad**2 / scale
        first = keep & (self.num_kept == 0)
        again = keep & (self.num_kept > 0)
        f = self.second_moment
        f[first] = score[first]
        f[again] = self.c.ema * f[again] + (1 - self.c.ema) * score[again]
        seen = (self.num_kept > 0) | keep
        if self.c.unkept_decay and bool(seen.any()):
            stale = ~keep & seen
            f[stale] += self.c.unkept_decay * (f[seen].mean() - f[stale])
        self.num_kept += keep.long()

    def update_budget(self) -> None:
        if not self.c.adaptive_budget:
            return
        d_eff_ratio, entropy = concentration(self.scores())
        flatness = (d_eff_ratio + entropy) / 2
        target = self.c.budget_min + (self.c.budget_max - self.c.budget_min) * flatness
        b = self.c.budget_ema * self.budget + (1 - self.c.budget_ema) * target
        self.budget = min(max(b, self.c.budget_min), self.c.budget_max)

    # ------------------------------------------------------------------ the step
    def step(self, loss_fn: LossFn, step: int) -> dict:
        eps, key = self.cfg.eps, (step, 0)
        probs = self.keep_probs()
        keep = self.draw_mask(probs, step)
        kept = [s for s in self.shards if bool(keep[self.units.unit_of[s.name]])]
        names = [n for n, _, _ in self.blocks if bool(keep[self.units.unit_of[n]])]  # all ranks' tensors
        record = {"keep_fraction": float((self.units.sizes * keep).sum()) / self.units.total,
                  "budget": self.budget, "forward_passes": 2}
        if not bool(keep.any()):  # nothing to probe: ĝ = 0 (still unbiased); one forward for the log
            self.update_budget()
            return {"loss": loss_fn(), "projected_grad": 0.0, **record, "forward_passes": 1}
        self.perturb(kept, key, +eps, names)
        loss_plus = loss_fn()
        self.perturb(kept, key, -2 * eps, names)
        loss_minus = loss_fn()
        if not self.finite(loss_plus, loss_minus):
            self.perturb(kept, key, +eps, names)  # restore only; scores and budget untouched
            return {"loss": float("nan"), "projected_grad": float("nan"), **record, "skipped": True}
        g = (loss_plus - loss_minus) / (2 * eps)
        inv_prob = (1.0 / probs).tolist()
        self.restore_and_update(kept, key, eps, lambda s: g * inv_prob[self.units.unit_of[s.name]])
        self.update_scores(keep, probs, g)
        self.update_budget()
        return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": g, **record}

    def state_dict(self) -> dict:
        """Per block: normalised score, keep probability for the next step, times kept; and the budget."""
        scores, probs = self.scores().tolist(), self.keep_probs().tolist()
        kept = self.num_kept.tolist()
        raw = self.second_moment.tolist()  # F_b itself: what a checkpoint must restore (scores are F/ΣF)
        blocks = {name: {"score": s, "keep_prob": p, "num_kept": k, "second_moment": f}
                  for name, s, p, k, f in zip(self.units.names, scores, probs, kept, raw)}
        return {"optimizer": "curvzo", "budget": self.budget, "blocks": blocks}

    def load_state_dict(self, state: dict) -> None:
        """Back to the state `state_dict` described (a checkpoint): F_b, times kept and the budget, exactly
        (JSON keeps every bit of a float64)."""
        blocks = self.check_state(state, "blocks", self.units.names)
        self.second_moment = torch.tensor([blocks[n]["second_moment"] for n in self.units.names],
                                          dtype=torch.float64)
        self.num_kept = torch.tensor([blocks[n]["num_kept"] for n in self.units.names], dtype=torch.int64)
        self.budget = float(state["budget"])
