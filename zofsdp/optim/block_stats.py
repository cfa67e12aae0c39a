"""Per-block statistics that CurvZO learns from the all-reduced losses (identical on every rank).

Why a regression. All blocks kept in a step share one Δ, so a block's own Δ² says little about it: a
kept-only EMA of Δ²/π² converges to (C + (1 − π_b)G_b)/π_b² with C = Σ_c π_c G_c, nearly flat in G_b
(../shared/CURVZO-REVIEW.md §2). What the masks do identify is the conditional mean: with u = m ⊙ z,
z ~ N(0, I), Δ = uᵀg, so E[Δ² | m] = Σ_b m_b G_b with G_b = ‖g_b‖² (the cross terms vanish because
z_b ⟂ z_c; with minibatch noise G_b also holds the noise's variance V_b). Likewise, with ℓ₀ = L(θ),
(ℓ₊ + ℓ₋ − 2ℓ₀)/ε² = uᵀHu + O(ε²) and E[uᵀHu | m] = Σ_b m_b tr H_b. Both are linear in the mask, so one
least-squares fit of the observations on the masks recovers the per-block values.
"""

from __future__ import annotations

import torch

RIDGE = 1e-3
"""Ridge weight, relative to the mean diagonal of the Gram matrix: keeps the solve defined while a block
has never been kept, and pulls such a block's estimate toward 0 (the sampler's floor π_min still visits it)."""


class MaskRegression:
    """Running least squares of a scalar y on the step's 0/1 mask: E[y | m] = Σ_b m_b x_b, estimate x.

    Accumulates the normal equations MᵀM and Mᵀy in float64 on the host with a forgetting factor (old
    steps fade, so the estimate follows a drifting gradient); O(B²) per observation and one B×B solve
    when the estimate is read. Each observation is weighted by 1/(number kept)²: Var(Δ² | m) =
    2(Σ m_b G_b)² grows with the number of kept blocks, and this is the part of that variance the mask
    alone predicts (weights from the current estimate itself are noisy early and were worse in simulation).
    """

    def __init__(self, num: int, forget: float):
        self.forget = forget
        self.gram = torch.zeros(num, num, dtype=torch.float64)
        self.moment = torch.zeros(num, dtype=torch.float64)
        self.num_obs = 0
        self._cache: torch.Tensor | None = None

    def add(self, mask: torch.Tensor, y: float) -> None:
        m = mask.to(torch.float64)
        w = 1.0 / max(float(m.sum()), 1.0) ** 2
        self.gram.mul_(self.forget).add_(torch.outer(m, m), alpha=w)
        self.moment.mul_(self.forget).add_(m, alpha=w * y)
        self.num_obs += 1
        self._cache = None

    @property
    def empty(self) -> bool:
        return not bool(self.gram.diagonal().any())

    def estimate(self) -> torch.Tensor:
        """x̂ (may be negative where the data say "about zero"; callers clamp)."""
        if self._cache is None:
            num = self.moment.numel()
            if self.empty:
                self._cache = torch.zeros(num, dtype=torch.float64)
            else:
                ridge = RIDGE * float(self.gram.diagonal().mean())
                a = self.gram + ridge * torch.eye(num, dtype=torch.float64)
                self._cache = torch.linalg.solve(a, self.moment)
        return self._cache

    def state_dict(self) -> dict:
        return {"gram": self.gram.tolist(), "moment": self.moment.tolist(), "num_obs": self.num_obs}

    def load_state_dict(self, state: dict) -> None:
        self.gram = torch.tensor(state["gram"], dtype=torch.float64)
        self.moment = torch.tensor(state["moment"], dtype=torch.float64)
        self.num_obs = int(state["num_obs"])
        self._cache = None


class EmaScores:
    """The first rule (`score: ema`): F_b ← ema·F_b + (1 − ema)·Δ²/π_b² on kept blocks, the first keep
    initialises F_b, unkept blocks drift `unkept_decay` of the way to the mean. Kept as the documented
    baseline: its fixed point is nearly flat in G_b, so it carries no information (tests/unit/test_curvzo.py)."""

    def __init__(self, num: int, cfg):
        self.c = cfg
        self.second_moment = torch.zeros(num, dtype=torch.float64)
        self.num_kept = torch.zeros(num, dtype=torch.int64)

    def scores(self) -> torch.Tensor:
        """F normalised; blocks never kept borrow the mean of the others (uniform at the start)."""
        f = self.second_moment.clone()
        seen = self.num_kept > 0
        if not bool(seen.any()) or float(f[seen].sum()) <= 0:
            return torch.full_like(f, 1.0 / f.numel())
        f[~seen] = f[seen].mean()
        return f / f.sum()

    def update(self, keep: torch.Tensor, probs: torch.Tensor, projected_grad: float) -> None:
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


def pps_probs(scores: torch.Tensor, expected: float) -> torch.Tensor:
    """Poisson-PPS inclusion probabilities: π ∝ score with Σ π = expected, units that would exceed 1 set
    to 1 and the rest rescaled (no floor)."""
    s = scores.clamp_min(0)
    probs = torch.zeros_like(s)
    full = torch.zeros_like(s, dtype=torch.bool)
    for _ in range(s.numel()):
        left = expected - float(full.sum())
        rest = s * ~full
        if left <= 0 or float(rest.sum()) <= 0:
            break
        probs = torch.where(full, 1.0, rest * left / float(rest.sum()))
        if not bool((probs > 1).any()):
            break
        full |= probs >= 1
    return probs.clamp(0, 1)


class ReleasedRule:
    """`preset: released`, the released CurvZO code's rules as ../shared/CURVZO-REVIEW.md §1 reads its port:
    tensor units; budget k counted in tensors, start 0.4·T, clipped to [0.1·T, 0.8·T]; π ∝ score by
    Poisson-PPS, no floor; score EMA (old weight 0.9, start 0.01) of (|Δ|/EMA|Δ|) × the kept tensor's share
    of Σ_{kept} n_c/π_c² (the block-total energy Σ z² ≈ n_b, so it grows with the tensor's size); every 20
    steps raw = 0.1 + 0.7·(0.7·d_eff/T + 0.3·(1 − H)), d_eff = (Σ√s)²/Σs, k ← 0.9·k + 0.1·raw·T.
    The EMA rate of |Δ| (0.9) is ours: the review does not give it."""

    EVERY = 20

    def __init__(self, num: int, sizes: torch.Tensor):
        self.sizes = sizes
        self.score = torch.full((num,), 0.01, dtype=torch.float64)
        self.k = 0.4 * num
        self.mean_abs = 0.0

    def probs(self) -> torch.Tensor:
        return pps_probs(self.score, float(int(self.k)))

    def update(self, keep: torch.Tensor, probs: torch.Tensor, projected_grad: float, step: int) -> None:
        a = abs(projected_grad)
        self.mean_abs = a if self.mean_abs == 0 else 0.9 * self.mean_abs + 0.1 * a
        energy = torch.where(keep, self.sizes / probs.clamp_min(1e-12).square(), 0.0)
        if float(energy.sum()) > 0 and self.mean_abs > 0:
            new = (a / self.mean_abs) * energy / energy.sum()
            self.score = torch.where(keep, 0.9 * self.score + 0.1 * new, self.score)
        if step % self.EVERY == 0:
            num = self.score.numel()
            p = self.score / self.score.sum()
            d_eff = float(self.score.sqrt().sum()) ** 2 / float(self.score.sum())
            nz = p[p > 0]
            entropy = -float((nz * nz.log()).sum()) / float(torch.log(torch.tensor(float(num))))
            raw = 0.1 + 0.7 * (0.7 * d_eff / num + 0.3 * (1 - entropy))
            self.k = min(max(0.9 * self.k + 0.1 * raw * num, 0.1 * num), 0.8 * num)

    def state_dict(self) -> dict:
        return {"score": self.score.tolist(), "k": self.k, "mean_abs": self.mean_abs}

    def load_state_dict(self, state: dict) -> None:
        self.score = torch.tensor(state["score"], dtype=torch.float64)
        self.k, self.mean_abs = float(state["k"]), float(state["mean_abs"])


def predicted_decrease(pi: torch.Tensor, n: torch.Tensor, trace: torch.Tensor, energy: torch.Tensor,
                       alpha: float) -> torch.Tensor:
    """D(π, α) = (gᵀEĝ)²/(2·E ĝᵀHĝ), the best one-step decrease of the review's quadratic model, for each
    row of candidate probabilities pi [C, B] (zofsdp.measure.landscape.best_decrease, one row at a time):
    gᵀEĝ = Σ π^(1−α)·G, E‖ĝ_b‖² = π_b^(1−2α)·[(n_b + 2)·G_b + n_b·(C − π_b·G_b)], C = Σ π·G, H_b = tr H_b/n_b."""
    c = (pi * energy).sum(dim=1, keepdim=True)
    second = pi.pow(1 - 2 * alpha) * ((n + 2) * energy + n * (c - pi * energy))
    gain = (pi.pow(1 - alpha) * energy).sum(dim=1)
    return gain.square() / (2 * (trace / n * second).sum(dim=1))


def best_scale(weights: torch.Tensor, n: torch.Tensor, trace: torch.Tensor, energy: torch.Tensor,
               alpha: float, pi_min: float, num: int = 64) -> torch.Tensor:
    """π = clip(c·w, π_min, 1) with the c (of `num` on a geometric grid, from all-at-π_min to all-at-1)
    that maximises `predicted_decrease`: the kept mass chosen by the model rather than a budget rule."""
    w = weights / float(weights.max())
    lo, hi = pi_min, 1.0 / float(w.min())
    scales = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), num, dtype=w.dtype)
    candidates = (scales[:, None] * w[None, :]).clamp(pi_min, 1.0)
    return candidates[int(predicted_decrease(candidates, n, trace, energy, alpha).argmax())]
