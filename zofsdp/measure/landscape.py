"""What a block sampler can buy per step: the review's F1–F3 formulas (../shared/CURVZO-REVIEW.md §2), and
`zofsdp bench --sections landscape`, which measures their inputs on a real model with autograd.

Notation (the review's). Blocks b = 1..B (a tensor, or a layer of tensors) of n_b coordinates;
a_b = tr H_b the block's curvature trace, G_b = ‖E g_b‖² its gradient energy, V_b = E‖g̃_b − g_b‖² the
minibatch noise of the stochastic gradient g̃. A sparse ZO step keeps block b with probability π_b
(m_b ~ Bernoulli(π_b), independently), probes u = m ⊙ z with z ~ N(0, I), reads Δ = g̃ᵀu (the two-sided
difference of a quadratic is exact, so ε drops out) and updates θ ← θ − η·ĝ with ĝ_b = π_b^{−α}·m_b·Δ·z_b:
α = 1 is Horvitz–Thompson (CurvZO, AdaLeZO), α = 0 is Sparse-MeZO, π ≡ 1 is dense MeZO.

The model behind the one-step figures (what is assumed):
- the loss is locally quadratic, L(θ − ηĝ) = L − η·gᵀĝ + ½η²·ĝᵀHĝ, with H block-diagonal and isotropic
  inside a block, H = ⊕ h_b·I_{n_b}, h_b = a_b/n_b (for a non-isotropic block the own term's 2/n_b
  correction becomes 2·g_bᵀH_b g_b/(a_b·G_b), and cross-block curvature adds terms of the size of
  gᵀHg ≪ tr H·‖g‖²; both are dropped);
- the step is judged on the population loss, while Δ uses a minibatch gradient g̃ = g + ξ, E ξ = 0,
  E‖ξ_b‖² = V_b, ξ independent of (m, z); correlations of ξ across blocks do not enter;
- a_b > 0 (positive curvature in every block), else the best step is unbounded;
- each method is run at its own best learning rate η* (a sweep), which is what D compares.

Then (S_b = G_b + V_b, C = Σ_c π_c·S_c, k_b = 1 + 2/n_b; E[(zᵀs)²‖z‖²] = (n + 2)‖s‖² for Gaussian z):
  E ĝ_b = π_b^{1−α}·g_b, so gᵀEĝ = Σ_b π_b^{1−α}·G_b (the noise has mean 0 and drops out);
  E‖ĝ_b‖² = π_b^{1−2α}·[k_b·n_b·S_b + n_b·(C − π_b·S_b)];
  E ĝᵀHĝ = Σ_b h_b·E‖ĝ_b‖²;
  D(π, α) = (gᵀEĝ)² / (2·E ĝᵀHĝ), the best expected one-step decrease, at η* = gᵀEĝ / E ĝᵀHĝ.
Dense MeZO is π ≡ 1 (any α): D₀ = ‖g‖⁴ / (2·E₀), E₀ = tr H·ΣS + 2·Σ h_b·S_b.
F1 (uniform π = q, any α): D/D₀ = 1 / (1 + (1/q − 1)·P/E₀), P = Σ_b a_b·k_b·S_b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zofsdp.errors import UserError

ALPHAS = (1.0, 0.5, 0.0)
"""Weight exponents the optimiser tries: Horvitz–Thompson, square root, none (Sparse-MeZO)."""


@dataclass(slots=True)
class Blocks:
    """Per-block inputs of the formulas, float64 tensors of shape [B]."""

    n: torch.Tensor
    """coordinates per block."""
    trace: torch.Tensor
    """a_b = tr H_b (must be > 0)."""
    energy: torch.Tensor
    """G_b = ‖E g_b‖²."""
    noise: torch.Tensor
    """V_b = E‖g̃_b − g_b‖² of the minibatch gradient (0: full-batch gradient)."""

    @staticmethod
    def of(n, trace, energy, noise=None) -> Blocks:
        n, trace, energy = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (n, trace, energy))
        noise = torch.zeros_like(energy) if noise is None else torch.as_tensor(noise, dtype=torch.float64).flatten()
        blocks = Blocks(n, trace, energy, noise)
        blocks.check()
        return blocks

    def check(self) -> None:
        if not len(self.n) == len(self.trace) == len(self.energy) == len(self.noise):
            raise UserError("n, trace, energy and noise need one entry per block")
        if bool((self.n < 1).any()) or bool((self.trace <= 0).any()):
            raise UserError("every block needs n_b >= 1 and a positive curvature trace a_b (the formulas "
                            "assume a positive-definite block Hessian)")
        if bool((self.energy < 0).any()) or bool((self.noise < 0).any()) or float(self.energy.sum()) <= 0:
            raise UserError("gradient energies and noises must be >= 0, with some gradient energy")

    @property
    def total_energy(self) -> torch.Tensor:
        """S_b = G_b + V_b: what Δ² sees of block b."""
        return self.energy + self.noise


def gain(blocks: Blocks, pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """gᵀEĝ = Σ_b π_b^{1−α}·G_b."""
    return (pi.pow(1 - alpha) * blocks.energy).sum()


def second_moments(blocks: Blocks, pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """[B] E‖ĝ_b‖² = π_b^{1−2α}·[(n_b + 2)·S_b + n_b·(C − π_b·S_b)], C = Σ_c π_c·S_c."""
    s = blocks.total_energy
    c = (pi * s).sum()
    return pi.pow(1 - 2 * alpha) * ((blocks.n + 2) * s + blocks.n * (c - pi * s))


def curvature(blocks: Blocks, pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """E ĝᵀHĝ = Σ_b (a_b/n_b)·E‖ĝ_b‖²."""
    return (blocks.trace / blocks.n * second_moments(blocks, pi, alpha)).sum()


def loss_change(blocks: Blocks, pi: torch.Tensor, alpha: float, lr: float) -> torch.Tensor:
    """E L(θ − ηĝ) − L(θ) = −η·gᵀEĝ + ½η²·E ĝᵀHĝ (exact on the quadratic model)."""
    return -lr * gain(blocks, pi, alpha) + 0.5 * lr * lr * curvature(blocks, pi, alpha)


def best_decrease(blocks: Blocks, pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """D(π, α) = (gᵀEĝ)² / (2·E ĝᵀHĝ), the decrease at the best learning rate."""
    return gain(blocks, pi, alpha).square() / (2 * curvature(blocks, pi, alpha))


def best_lr(blocks: Blocks, pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """η* = gᵀEĝ / E ĝᵀHĝ."""
    return gain(blocks, pi, alpha) / curvature(blocks, pi, alpha)


def ratio_to_dense(blocks: Blocks, pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """D(π, α) / D(1, ·): > 1 means fewer steps (= forward passes) than dense MeZO, each at its best lr."""
    return best_decrease(blocks, pi, alpha) / best_decrease(blocks, torch.ones_like(pi), 1.0)


def uniform_ratio(blocks: Blocks, q: float) -> float:
    """F1: D/D₀ at π ≡ q for any α, 1 / (1 + (1/q − 1)·P/E₀)."""
    s, h = blocks.total_energy, blocks.trace / blocks.n
    p = float((blocks.trace * (1 + 2 / blocks.n) * s).sum())
    e0 = float(blocks.trace.sum() * s.sum() + 2 * (h * s).sum())
    return 1.0 / (1.0 + (1.0 / q - 1.0) * p / e0)


# ----------------------------------------------------------------------------------- best sampler


def project(y: torch.Tensor, n: torch.Tensor, pi_min: float, mass: float | None) -> torch.Tensor:
    """The point of [π_min, 1]^B ∩ {Σ n·π ≤ mass} nearest to y in the n-weighted norm Σ n_b(π_b − y_b)²:
    clip(y − λ, π_min, 1) with the smallest λ ≥ 0 that meets the budget (found by bisection)."""
    pi = y.clamp(pi_min, 1.0)
    if mass is None or float((n * pi).sum()) <= mass:
        return pi
    lo, hi = 0.0, float(y.max()) - pi_min
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float((n * (y - mid).clamp(pi_min, 1.0)).sum()) > mass:
            lo = mid
        else:
            hi = mid
    return (y - hi).clamp(pi_min, 1.0)


def _ascend(blocks: Blocks, alpha: float, start: torch.Tensor, pi_min: float, mass: float | None,
            iterations: int) -> tuple[float, torch.Tensor]:
    """Projected gradient ascent on log D with a backtracking step. The gradient is divided by n_b (the
    metric of `project`), so that a 576-element norm and a 28M-element embedding move at comparable rates."""
    def objective(pi):
        return 2 * gain(blocks, pi, alpha).log() - curvature(blocks, pi, alpha).log()

    pi, step = start.clone(), 1.0
    value = float(objective(pi))
    for _ in range(iterations):
        x = pi.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x), x)
        direction = grad / blocks.n * float(blocks.n.mean())
        while step > 1e-12:
            trial = project(pi + step * direction, blocks.n, pi_min, mass)
            trial_value = float(objective(trial))
            if trial_value > value + 1e-4 * float((grad * (trial - pi)).sum()):
                break
            step *= 0.5
        else:
            break
        if float((trial - pi).abs().max()) < 1e-10:
            break
        pi, value, step = trial, trial_value, min(step * 2.0, 1e6)
    return value, pi


def best_sampler(blocks: Blocks, alpha: float, pi_min: float = 0.01, budget: float | None = None,
                 iterations: int = 400) -> dict:
    """The π ∈ [π_min, 1]^B (with Σ n_b·π_b ≤ budget·Σ n_b when a budget is given) that maximises D(π, α),
    from several starts: dense (or uniform at the budget), the review's π ∝ √(a_b/S_b) and π ∝ √S_b.
    Returns the ratio to dense MeZO, the best lr relative to dense's, the kept fraction Σnπ/Σn and π."""
    with torch.no_grad():
        n, s = blocks.n, blocks.total_energy
        mass = None if budget is None else budget * float(n.sum())
        starts = [project(torch.ones_like(n), n, pi_min, mass)]
        for rule in ((blocks.trace / s.clamp_min(1e-300)).sqrt(), s.sqrt()):
            w = rule / float(rule.max())
            starts.append(project(w, n, pi_min, mass))
    best = max((_ascend(blocks, alpha, x, pi_min, mass, iterations) for x in starts), key=lambda r: r[0])
    pi = best[1]
    dense = torch.ones_like(pi)
    return {"ratio": float(ratio_to_dense(blocks, pi, alpha)),
            "lr_over_dense": float(best_lr(blocks, pi, alpha) / best_lr(blocks, dense, 1.0)),
            "kept_fraction": float((n * pi).sum() / n.sum()), "alpha": alpha, "pi": pi.tolist()}


def best_over_alphas(blocks: Blocks, pi_min: float = 0.01, budget: float | None = None) -> dict:
    """`best_sampler` at each α in ALPHAS; the best one, with every α's ratio beside it."""
    runs = {alpha: best_sampler(blocks, alpha, pi_min, budget) for alpha in ALPHAS}
    best = dict(max(runs.values(), key=lambda r: r["ratio"]))
    best["ratio_by_alpha"] = {str(a): r["ratio"] for a, r in runs.items()}
    return best


def spread(values: torch.Tensor) -> dict:
    """Quantiles of log10(values) and the max/min ratio: how far a per-block quantity varies."""
    logs = torch.as_tensor(values, dtype=torch.float64).log10()
    q = torch.quantile(logs, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    return {"log10_min": q[0], "log10_p10": q[1], "log10_median": q[2], "log10_p90": q[3], "log10_max": q[4],
            "p90_over_p10": 10 ** (q[3] - q[1]), "max_over_min": 10 ** (q[4] - q[0])}


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's ρ (no ties expected in measured values)."""
    rx, ry = (t.argsort().argsort().double() for t in (torch.as_tensor(x), torch.as_tensor(y)))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt(float((rx * rx).sum() * (ry * ry).sum())))
