"""CurvZO: curvature-guided sparse ZO (Wang, Chen, Tang, "CurvZO: Adaptive Curvature-Guided Sparse
Zeroth-Order Optimization for Efficient LLM Fine-Tuning", arXiv 2603.21725, 2026), block-wise variant.

Estimator. Each unit b (a layer by default: `embed`, `layers.<i>`, `head`; one tensor with `granularity:
tensor`) is kept with probability π_b, m_b ~ Bernoulli(π_b), independently, from a generator seeded by
(run seed, step): every rank draws the same mask. With u = m ⊙ z, ℓ± = L(θ ± εu), Δ = (ℓ₊ − ℓ₋)/(2ε), the
update is ĝ_b = Δ·m_b·z_b·w_b with w_b = q^(α−1)·min(π_b^(−α), max_weight), q the budget: α = 1 without a
clip is Horvitz–Thompson, E[ĝ] = ∇L + O(ε²); α < 1 gives E ĝ_b = q^(α−1)·π_b^(1−α)·g_b (the q factor keeps
the lr's meaning; review §2 F1). Only kept units are perturbed, updated or generate noise (three passes:
+εu, −2εu, restore and update fused as in MeZO).

What drives π (`score`; block_stats.py explains the estimators):
- `regression` (default): E[Δ² | m] = Σ_b m_b G_b, G_b = ‖g_b‖² (+ minibatch variance), so a running least
  squares of Δ² on the masks estimates Ĝ; π ∝ √(Ĝ + 0.2·mean Ĝ) under the budget Σ n_b π_b = B·d, clipped to
  [π_min, 1] by water-filling (`sampling.budgeted_probs`). Minimising Σ G_b/π_b gives the square root.
- `ema`: the first rule, kept for comparison: an EMA of Δ²/π_b² over the steps b was kept. All kept units
  share one Δ², so it converges to a nearly flat function of G_b: it does not rank the units.
- `uniform`: π = budget_init everywhere, nothing learned, budget fixed: the uniform-sparse control.
- `fixed`: π per unit read from `probs_file` (e.g. the landscape bench's best sampler: an oracle control).
- `snr`: every `snr_every`-th step the same probe is also scored on a second batch, Δ' = uᵀ(ḡ + ξ'), so
  E[Δ·Δ' | m] = Σ_b m_b‖ḡ_b‖² (the two batches' noises ξ, ξ' are independent) while E[Δ² | m] =
  Σ_b m_b(‖ḡ_b‖² + V_b). Two regressions on the masks give the population energy P̂_b and the batch noise
  V̂_b = Ĝ_b − P̂_b; S = ((P̂_b + EXPLORE·mean P̂)/V̂_b)², so π ∝ P̂_b/V̂_b: a per-unit signal-to-noise, the
  ranking (G over Fisher trace) of the landscape bench's best biased sampler. Use it with weight_power 0.
- `snr_rows`: the same ratio from every probe, with no extra forward: the two forwards return each
  example's loss, d_i = (ℓ₊ᵢ − ℓ₋ᵢ)/(2ε), and over the B rows s² = var(d_i) has E[s² | m] = Σ_b m_b v_b
  (v_b the per-example gradient variance) while E[Δ² − s²/B | m] = Σ_b m_b‖ḡ_b‖². Both are regressed on the
  masks; π ∝ P̂_b/v̂_b. The two statistics go through `decide`, so the seed log holds them and replay is exact.
- `preset: released` replaces all of this by the released code's rules (block_stats.ReleasedRule).
Adaptive budget (regression, ema): flatness φ = (d_eff/G + H)/2 of the normalised scores, target
B* = B_min + (B_max − B_min)·φ, B ← budget_ema·B + (1 − budget_ema)·B*, clipped to [B_min, B_max].

Curvature (`curvature_every: K`). Every K-th step also reads ℓ₀ = L(θ) first (3 forwards that step) and
regresses (ℓ₊ + ℓ₋ − 2ℓ₀)/ε² = uᵀHu + O(ε²), E[uᵀHu | m] = Σ_b m_b tr H_b, on the masks. Those steps draw
their masks at π = ½ (DESIGN_PI). `sampling: curv_ratio` then samples π ∝ √(tr Ĥ_b/Ĝ_b), the review's
rule for when curvature does not track gradient energy, with the kept mass that maximises the review's
predicted one-step decrease (dense when they do track); dense until each unit has two ℓ₀ observations.
On quadratics this matches MeZO per forward but does not beat it 5×: docs/optimizers.md.

Curvature step (`sampling: curv_step`, weight_power 0). A step of size η along u changes the loss by
−ηΔ²(1 − ½η·uᵀHu): it overshoots once η·uᵀHu > 2, which is how MeZO diverges at a large lr. With ℓ₀ read,
uᵀHu is known before the update, so the step is capped: η = lr·min(1, κ/(lr·uᵀHu)), κ = curvature_budget.
Then no step raises a quadratic's loss, and the lr stops being a stability limit. Which units go into u
decides how far a capped step gets (about (uᵀg)²/(2·uᵀHu)): units with much gradient energy per unit
curvature give long steps, one sharp unit in the mask shortens the step for all. So π_b ∝ Ĝ_b/tr Ĥ_b,
scaled so the best unit has π = 1, floored at π_min, and not reweighted (α = 0: π is a per-unit step size).
All of this only while the budget binds, lr·Σ tr Ĥ_b > κ: ℓ₀ on every step (3 forwards), and for the first
B of them masks at π = ½ so the regressions can tell the units apart. Otherwise the step is dense MeZO with
an ℓ₀ every K steps to notice when it starts to bind. On the review's F3 quadratic it learns to leave the
sharp units out and needs 6× (lr 1) to 64× (lr 100) fewer forwards than MeZO at MeZO's best lr; on the
aligned quadratic it is MeZO plus its ℓ₀ forwards (docs/optimizers.md).

Every decision comes from the all-reduced losses, so it is identical on every rank, and replay (the
seed log holds every loss, ℓ₀ included) and resume (state_dict holds the normal equations) are exact.
"""

from __future__ import annotations

import torch

from zofsdp.noise import Shard
from zofsdp.optim.base import LossFn, ZOOptimizer, decide
from zofsdp.optim.block_stats import EmaScores, MaskRegression, ReleasedRule, best_scale
from zofsdp.optim.sampling import BlockSpec, budgeted_probs, build_units, concentration, generator, read_probs

MASK_TAG = 0xC0_2F  # mixes into the mask generator's seed so masks never reuse the noise's streams
FLOOR = 1e-6  # curv_ratio: estimates below this fraction of the largest count as this (noise, not zero)
DESIGN_PI = 0.5
"""On ℓ₀ steps (every curvature_every) every unit is kept with probability ½, whatever π the sampler wants:
these are the measurement steps, and 0/1 masks at ½ are the most informative design for both regressions.
Without them the estimates stall once π reaches 1 (all-ones masks identify only the sum over units).
Their update weighs every kept unit 1, not 1/π = 2 (E ĝ = g/2, half a step): a doubled step on a unit the
sampler keeps always can break that unit's stability (lr·h·(n + 2) < 2) and diverge the run."""
H_FLOOR = 1e-3
"""The denominators of a ratio score, curv_step's tr Ĥ_b and snr's V̂_b: an estimate below this fraction of the
largest counts as this (the regressions cannot resolve values far below the largest units' noise; a unit read
as ~0 must not get an infinite ratio)."""
EXPLORE = 0.2
"""sqrt_g samples by √(Ĝ_b + EXPLORE·mean Ĝ): a block whose estimate is still noisy-low keeps being visited
(recovery test: mean Spearman 0.49 → 0.58 at the default budget; without it early noise starves blocks)."""


class CurvZO(ZOOptimizer):
    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", blocks: list[BlockSpec] | None = None,
                 **precision):
        super().__init__(shards, cfg, seed, device, blocks=blocks, **precision)
        self.c = cfg.curvzo
        released = self.c.preset == "released"
        self.units = build_units(self.blocks, "tensor" if released else self.c.granularity)
        num = len(self.units.names)
        self.energy = MaskRegression(num, self.c.forget)
        """Δ² regressed on the masks: Ĝ_b = ‖g_b‖² (+ minibatch variance)."""
        self.curvature = MaskRegression(num, self.c.forget)
        """(ℓ₊ + ℓ₋ − 2ℓ₀)/ε² regressed on the masks: tr H_b (only fed when curvature_every > 0)."""
        self.signal = MaskRegression(num, self.c.forget)
        """Δ·Δ' (the probe on two batches; score=snr) or Δ² − s²/B (the rows of one batch; snr_rows) regressed on
        the masks: ‖ḡ_b‖² without batch noise."""
        self.spread = MaskRegression(num, self.c.forget)
        """s², the per-example spread of the probe's differences, regressed on the masks: v_b (score=snr_rows)."""
        self.ema = EmaScores(num, self.c)
        self.released = ReleasedRule(num, self.units.sizes) if released else None
        self.budget = self.released.k / num if released else self.c.budget_init
        self.fixed = read_probs(self.c.probs_file, self.units, self.c.granularity) if self.c.score == "fixed" else None
        if self.fixed is not None:
            self.budget = self.units.fraction(self.fixed)
        if self.curv_ratio_mode() or self.guarded():
            self.budget = 1.0  # dense until the statistics say otherwise

    # ------------------------------------------------------------------ decisions (identical on all ranks)
    def g_hat(self) -> torch.Tensor:
        return self.energy.estimate().clamp_min(0)

    def scores(self) -> torch.Tensor:
        """S, normalised, with π ∝ √S under the budget (flat when nothing is learned yet)."""
        if self.released is not None:
            s = self.released.score
        elif self.c.score == "ema":
            s = self.ema.scores()
        elif self.c.score == "uniform":
            s = torch.ones(len(self.units.names), dtype=torch.float64)
        elif self.fixed is not None:
            s = self.fixed.square()  # π ∝ √S
        elif self.c.score in ("snr", "snr_rows"):
            s = self.snr()
        elif self.curvature_ready():
            s = self.curv_ratio()
        else:
            g = self.g_hat()
            s = g + EXPLORE * g.mean()
        if float(s.sum()) <= 0:
            s = torch.ones_like(s)
        return s / s.sum()

    def snr(self) -> torch.Tensor:
        """score=snr / snr_rows: ((P̂ + EXPLORE·mean P̂)/V̂)², flat until there are as many observations as units."""
        num = len(self.units.names)
        if self.signal.num_obs < num:
            return torch.ones(num, dtype=torch.float64)
        p = self.signal.estimate().clamp_min(0)
        v = self.spread.estimate() if self.c.score == "snr_rows" else self.g_hat() - self.signal.estimate()
        v = v.clamp_min(H_FLOOR * max(float(v.max()), 1e-300))
        return ((p + EXPLORE * p.mean()) / v).square()

    def curv_ratio_mode(self) -> bool:
        return self.c.sampling == "curv_ratio" and self.c.score == "regression" and self.released is None

    def guarded(self) -> bool:
        return self.c.sampling == "curv_step"

    def binding(self) -> bool:
        """curv_step: would a dense step at this lr overshoot the curvature budget? lr·Σ tr Ĥ_b > κ. The sum is
        not clamped: clamping noisy units' estimates at 0 would bias it up and keep the rule binding. (A history
        of dense masks fixes only the sum, which the ridge spreads evenly: the sum is still right.)"""
        if self.curvature.num_obs == 0:
            return False
        total = float(self.curvature.estimate().sum())
        return self.cfg.lr * total > self.c.curvature_budget

    def step_probs(self) -> torch.Tensor:
        """curv_step's π: dense while the budget does not bind; π = ½ for the first B binding observations;
        then π_b ∝ (Ĝ_b + EXPLORE·mean Ĝ)/tr Ĥ_b, the best unit at 1, floored at π_min."""
        num = len(self.units.names)
        if not self.binding():
            return torch.ones(num, dtype=torch.float64)
        if self.curvature.num_obs < num:
            return torch.full((num,), DESIGN_PI, dtype=torch.float64)
        h = self.curvature.estimate()
        h = h.clamp_min(H_FLOOR * float(h.max()))  # binding, so max > 0
        g = self.g_hat()
        ratio = (g + EXPLORE * g.mean()) / h
        if float(ratio.max()) <= 0:  # no energy seen yet
            return torch.full((num,), DESIGN_PI, dtype=torch.float64)
        return (ratio / ratio.max()).clamp(self.c.pi_min, 1.0)

    def step_scale(self, curvature: float | None) -> float:
        """curv_step: the factor min(1, κ/(lr·uᵀHu)) on this probe's lr (1 without ℓ₀, or where uᵀHu ≤ 0)."""
        if curvature is None or self.cfg.lr * curvature <= self.c.curvature_budget:
            return 1.0
        return self.c.curvature_budget / (self.cfg.lr * curvature)

    def measures(self, step: int) -> bool:
        """Does this step read ℓ₀? Every K-th step; curv_step also on its first step and while binding."""
        every = self.c.curvature_every
        if self.guarded():
            return self.curvature.num_obs == 0 or step % every == 0 or self.binding()
        return bool(every) and step % every == 0

    def curvature_ready(self) -> bool:
        """curv_ratio once the curvature regression has two observations per unit and sees some curvature."""
        return (self.curv_ratio_mode() and self.curvature.num_obs >= 2 * len(self.units.names)
                and float(self.curvature.estimate().max()) > 0 and float(self.g_hat().max()) > 0)

    def floored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tr Ĥ_b, Ĝ_b), each floored at FLOOR × its maximum (a negative or tiny estimate is noise)."""
        h, g = self.curvature.estimate(), self.g_hat()
        return h.clamp_min(FLOOR * float(h.max())), g.clamp_min(FLOOR * float(g.max()))

    def curv_ratio(self) -> torch.Tensor:
        h, g = self.floored()
        return h / g

    def keep_probs(self) -> torch.Tensor:
        if self.released is not None:
            return self.released.probs()
        if self.fixed is not None:
            return self.fixed.clone()
        if self.guarded():
            return self.step_probs()
        if self.curvature_ready():  # π ∝ √(tr H_b/G_b), its mass the one the quadratic model prefers
            h, g = self.floored()
            return best_scale((h / g).sqrt(), self.units.sizes, h, g, self.c.weight_power, self.c.pi_min)
        if self.curv_ratio_mode():  # warm-up: dense, the model's choice when it knows nothing (F1)
            return torch.ones(len(self.units.names), dtype=torch.float64)
        return budgeted_probs(self.scores().sqrt(), self.units.sizes, self.budget, self.c.pi_min)

    def update_weights(self, probs: torch.Tensor) -> list[float]:
        """Per unit: budget^(α−1)·min(π^(−α), max_weight); α = 1 is the HT weight 1/π, unbiased without clip.
        For α < 1, E ĝ_b = π_b^(1−α)·g_b, so at uniform π = q the step shrinks by q^(1−α): the factor q^(α−1)
        gives it back, and one lr serves every α (review §2, F1)."""
        if self.released is not None:
            return (1.0 / probs).tolist()
        a = self.c.weight_power
        w = probs.pow(-a)
        if self.c.max_weight:
            w = w.clamp_max(self.c.max_weight)
        return (w * self.budget ** (a - 1)).tolist()

    def draw_mask(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        u = torch.rand(probs.numel(), dtype=torch.float64, generator=generator(self.seed, step, MASK_TAG))
        return u < probs

    def learn(self, keep: torch.Tensor, probs: torch.Tensor, projected_grad: float, step: int,
              curvature: float | None = None) -> None:
        """Every statistic this step feeds (cheap: O(B²)); which one drives π is `score`."""
        self.energy.add(keep, projected_grad**2)
        if curvature is not None:
            self.curvature.add(keep, curvature)
        self.ema.update(keep, probs, projected_grad)
        if self.released is not None:
            self.released.update(keep, probs, projected_grad, step)
            self.budget = self.released.k / len(self.units.names)
        self.update_budget()

    def update_budget(self) -> None:
        if self.curv_ratio_mode() or self.guarded():  # the mass chosen by the rule: reported, not fed back
            self.budget = self.units.fraction(self.keep_probs())
            return
        if not self.c.adaptive_budget or self.c.score in ("uniform", "fixed") or self.released is not None:
            return
        d_eff_ratio, entropy = concentration(self.scores())
        flatness = (d_eff_ratio + entropy) / 2
        target = self.c.budget_min + (self.c.budget_max - self.c.budget_min) * flatness
        b = self.c.budget_ema * self.budget + (1 - self.c.budget_ema) * target
        self.budget = min(max(b, self.c.budget_min), self.c.budget_max)

    # ------------------------------------------------------------------ the step
    def step(self, loss_fn: LossFn, step: int) -> dict:
        eps, key = self.cfg.eps, (step, 0)
        measure = self.measures(step)  # ℓ₀ (and, except for curv_step, the design masks)
        design = measure and not self.guarded()
        probs = torch.full_like(self.units.sizes, DESIGN_PI) if design else self.keep_probs()
        keep = self.draw_mask(probs, step)
        kept = [s for s in self.shards if bool(keep[self.units.unit_of[s.name]])]
        names = [n for n, _, _ in self.blocks if bool(keep[self.units.unit_of[n]])]  # all ranks' tensors
        record = {"keep_fraction": self.units.fraction(keep),
                  "budget": self.budget, "forward_passes": 2}
        if not bool(keep.any()):  # nothing to probe: ĝ = 0 (still unbiased); one forward for the log
            self.update_budget()
            loss = loss_fn()
            skipped = {} if self.finite(loss) else {"skipped": True}  # counted like any non-finite step
            return {"loss": loss, "projected_grad": 0.0, **record, "forward_passes": 1, **skipped}
        loss_zero = loss_fn() if measure else None  # ℓ₀ at θ, before any perturbation
        second = self.c.score == "snr" and step % self.c.snr_every == 0  # the probe on extra batch 1 too
        rows = {"per_example": True} if self.c.score == "snr_rows" else {}
        self.perturb(kept, key, +eps, names)
        loss_plus, plus_2 = loss_fn(**rows), loss_fn(batch=1) if second else 0.0
        self.perturb(kept, key, -2 * eps, names)
        loss_minus, minus_2 = loss_fn(**rows), loss_fn(batch=1) if second else 0.0
        record["forward_passes"] = 2 + (loss_zero is not None) + 2 * second
        if not self.finite(loss_plus, loss_minus, 0.0 if loss_zero is None else loss_zero, plus_2, minus_2):
            self.perturb(kept, key, +eps, names)  # restore only; scores and budget untouched
            return {"loss": float("nan"), "projected_grad": float("nan"), **record, "skipped": True}
        g = (loss_plus - loss_minus) / (2 * eps)
        curvature = None if loss_zero is None else (loss_plus + loss_minus - 2 * loss_zero) / eps**2
        if self.guarded():  # α = 0 and the step capped along its own probe
            record["step_scale"] = self.step_scale(curvature)
            weights = [record["step_scale"]] * len(probs)
        else:
            weights = [1.0] * len(probs) if design else self.update_weights(probs)  # see DESIGN_PI
        self.restore_and_update(kept, key, eps, lambda s: g * weights[self.units.unit_of[s.name]])
        if second:
            self.signal.add(keep, g * (plus_2 - minus_2) / (2 * eps))
        if rows:  # logged through decide: replay gets these two numbers back without the rows
            signal, spread = decide(loss_fn, example_stats(loss_plus, loss_minus, eps))
            if self.finite(signal, spread):
                self.signal.add(keep, signal)
                self.spread.add(keep, spread)
        self.learn(keep, probs, g, step, curvature)
        return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": g, **record}

    def state_dict(self) -> dict:
        """Per block: normalised score, keep probability for the next step, Ĝ, tr Ĥ, the old rule's F_b and
        times kept; the budget; and everything a resume needs bit for bit (the regressions' normal
        equations, the released rule's state)."""
        scores, probs = self.scores().tolist(), self.keep_probs().tolist()
        g, h = self.g_hat().tolist(), self.curvature.estimate().tolist()
        kept, raw = self.ema.num_kept.tolist(), self.ema.second_moment.tolist()
        blocks = {name: {"score": s, "keep_prob": p, "g_hat": gb, "trace_h": hb, "num_kept": k, "second_moment": f}
                  for name, s, p, gb, hb, k, f in zip(self.units.names, scores, probs, g, h, kept, raw)}
        state = {"optimizer": "curvzo", "budget": self.budget, "blocks": blocks,
                 "energy": self.energy.state_dict(), "curvature": self.curvature.state_dict(),
                 "signal": self.signal.state_dict(), "spread": self.spread.state_dict()}
        if self.released is not None:
            state["released"] = self.released.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Back to the state `state_dict` described (a checkpoint), exactly (JSON keeps every bit of a
        float64)."""
        blocks = self.check_state(state, "blocks", self.units.names)
        self.ema.second_moment = torch.tensor([blocks[n]["second_moment"] for n in self.units.names],
                                              dtype=torch.float64)
        self.ema.num_kept = torch.tensor([blocks[n]["num_kept"] for n in self.units.names], dtype=torch.int64)
        self.energy.load_state_dict(state["energy"])
        self.curvature.load_state_dict(state["curvature"])
        if "signal" in state:  # checkpoints from before score=snr have none
            self.signal.load_state_dict(state["signal"])
        if "spread" in state:  # nor from before score=snr_rows
            self.spread.load_state_dict(state["spread"])
        if self.released is not None:
            self.released.load_state_dict(state["released"])
        self.budget = float(state["budget"])


def example_stats(loss_plus, loss_minus, eps: float) -> list[float]:
    """[Δ² − s²/B, s²] from the rows of the two forwards (score=snr_rows): d_i = (ℓ₊ᵢ − ℓ₋ᵢ)/(2ε),
    Δ = mean d_i, s² = var(d_i). NaNs where the losses carry no rows (replay: `decide` returns the logged
    values)."""
    plus, minus = getattr(loss_plus, "per_example", None), getattr(loss_minus, "per_example", None)
    if not plus or not minus or len(plus) < 2:
        return [float("nan"), float("nan")]
    d = (torch.tensor(plus, dtype=torch.float64) - torch.tensor(minus, dtype=torch.float64)) / (2 * eps)
    spread = float(d.var())
    return [float(d.mean()) ** 2 - spread / d.numel(), spread]
