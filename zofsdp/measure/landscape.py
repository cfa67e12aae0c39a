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
  correction becomes 2·E[g̃_bᵀH_b g̃_b]/(a_b·S_b), and cross-block curvature adds terms of the size of
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

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zofsdp.errors import UserError

log = logging.getLogger("zofsdp")

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
    clip(y − λ, π_min, 1) with the smallest λ ≥ 0 that meets the budget.

    M(λ) = Σ n·clip(y − λ, π_min, 1) is piecewise linear and non-increasing: block b starts to fall at the
    knot λ = y_b − 1 (slope −n_b) and stops at λ = y_b − π_min (+n_b). Sorting the knots gives M at every
    knot by cumulative sums; the crossing segment is then solved exactly."""
    pi = y.clamp(pi_min, 1.0)
    if mass is None or float((n * pi).sum()) <= mass:
        return pi
    knots, order = torch.cat([y - 1.0, y - pi_min]).sort()
    slope = torch.cat([-n, n])[order].cumsum(0)  # slope of M just after each knot
    at_knots = n.sum() + torch.cat([knots.new_zeros(1), (slope[:-1] * knots.diff()).cumsum(0)])
    j = int((at_knots > mass).sum())  # M(knots[j-1]) > mass >= M(knots[j])
    if j == len(knots):  # all at π_min is still over the budget
        return torch.full_like(y, pi_min)
    lam = knots[j - 1] + (at_knots[j - 1] - mass) / -slope[j - 1]
    return (y - lam).clamp(pi_min, 1.0)


def _log_decrease(blocks: Blocks, pi: torch.Tensor, alpha: float) -> tuple[float, torch.Tensor]:
    """log D(π, α) up to a constant, and its gradient in π (by hand: this runs thousands of times).
    With w_b = a_b·π_b^{1−2α} and C = Σ π_c·S_c: E ĝᵀHĝ = Σ_b w_b·((k_b − π_b)·S_b + C)."""
    s, k = blocks.total_energy, 1 + 2 / blocks.n
    w = blocks.trace * pi.pow(1 - 2 * alpha)
    c = (pi * s).sum()
    curv = (w * ((k - pi) * s + c)).sum()
    gain_ = (pi.pow(1 - alpha) * blocks.energy).sum()
    d_curv = (1 - 2 * alpha) * w / pi * ((k - pi) * s + c) - w * s + s * w.sum()
    d_gain = (1 - alpha) * pi.pow(-alpha) * blocks.energy
    return float(2 * gain_.log() - curv.log()), 2 * d_gain / gain_ - d_curv / curv


def _ascend(blocks: Blocks, alpha: float, start: torch.Tensor, pi_min: float, mass: float | None,
            iterations: int) -> tuple[float, torch.Tensor]:
    """Projected gradient ascent on log D with a backtracking step. The gradient is divided by n_b (the
    metric of `project`), so that a 576-element norm and a 28M-element embedding move at comparable rates."""
    pi, step = start.clone(), 1.0
    value, grad = _log_decrease(blocks, pi, alpha)
    for _ in range(iterations):
        direction = grad / blocks.n * float(blocks.n.mean())
        while step > 1e-12:
            trial = project(pi + step * direction, blocks.n, pi_min, mass)
            if float((trial - pi).abs().max()) < 1e-10:  # stationary: the box and budget hold it there
                return value, pi
            trial_value, trial_grad = _log_decrease(blocks, trial, alpha)
            if trial_value > value + 1e-4 * float((grad * (trial - pi)).sum()):
                break
            step *= 0.5
        else:
            break
        converged = trial_value - value < 1e-10
        pi, value, grad, step = trial, trial_value, trial_grad, min(step * 2.0, 1e6)
        if converged:
            break
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


# ----------------------------------------------------------------------------------- measurement

QUICK = {"batches": 8, "probes": 1}
FULL = {"batches": 12, "probes": 1}
"""Batches of train.batch_size rows, and Rademacher Hessian probes per batch (`zofsdp bench --sections
landscape`). Full: ~22 s of one core per batch on SmolLM2-135M (batch 16, ~40 tokens): the gradient with its
graph kept ~8 s, each Hessian-vector product ~9 s, the Fisher probe one plain backward (~5 s). 12 batches
keep it near 5 min of a quiet core; the tables give each trace's standard error."""
BUDGETS = (0.1, 0.3, 0.5)
"""q: the kept-parameter budgets Σ n_b·π_b ≤ q·d at which the best and the uniform sampler are compared."""


def batch_tensors(session, examples: list, seed: int, probes: int) -> dict[str, torch.Tensor]:
    """One batch's figures, per tensor in model order: the gradient of the mean loss (`grad`, for the
    batches' mean) and its squared norm ‖g̃_t‖² ([T]), `probes` Hutchinson samples v_tᵀ(Hv)_t ([P, T]) with one
    Rademacher v over all parameters (E = tr H_t: the off-block terms average out), and one Fisher sample ‖∇_t f‖² with f = Σ_{i,k} r_ik·√p_ik·(s_ik − Σ_j p_ij·s_ij), r Rademacher: its mean is
    (1/B)·Σ_i tr(J_iᵀ(diag p_i − p_i p_iᵀ)J_i), the Gauss–Newton = Fisher trace of the mean cross-entropy
    over the candidates' scores s (the project's loss, zofsdp.scoring)."""
    import torch.nn.functional as F

    from zofsdp.scoring import candidate_scores, encode

    model, params = session.model, [p for _, p in session.model.named_parameters()]
    rows = encode(session.tokenizer, examples, session.cfg.model.max_length)
    scores = candidate_scores(model, rows)
    loss = F.cross_entropy(scores, rows.labels)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    out = {"grad": [x.detach().clone() for x in grads],
           "grad_sq": _per_tensor(x.detach() for x in grads), "fisher": _fisher(scores, rows, params, g)}
    hutchinson = []
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=g).to(p.dtype).mul_(2).sub_(1) for p in params]
        hv = torch.autograd.grad(sum((x * y).sum() for x, y in zip(grads, v)), params, retain_graph=True)
        hutchinson.append(torch.stack([(a.double() * b.double()).sum() for a, b in zip(hv, v)]))
    out["hutchinson"] = torch.stack(hutchinson)
    return out


def _per_tensor(tensors) -> torch.Tensor:
    return torch.stack([x.double().square().sum() for x in tensors])


def _fisher(scores: torch.Tensor, rows, params: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """One sample of the per-tensor Fisher trace of the mean loss (see `batch_tensors`)."""
    valid = rows.candidate_mask
    s = scores.masked_fill(~valid, 0.0)
    p = torch.softmax(scores, dim=1).detach()
    centred = s - (p * s).sum(dim=1, keepdim=True)
    signs = torch.randint(0, 2, s.shape, generator=g).to(s.dtype).mul_(2).sub_(1)
    f = (signs * p.sqrt() * centred * valid).sum()
    grads = torch.autograd.grad(f, params, retain_graph=True)
    return _per_tensor(grads) / len(rows)


def measure(session, num_batches: int, probes: int, seed: int = 0) -> dict:
    """Per-tensor figures over `num_batches` training batches (autograd; attention switched to the eager
    path because the fused CPU kernel has no double backward). Returns names, groups, n, and per batch:
    grad_sq [N, T], hutchinson [N, P, T], fisher [N, T]; mean_grad_sq [T] = ‖ḡ_t‖² of the batches' mean, and
    half_grad_sq [2, T] = the same over the even and the odd batches (for the split-half check)."""
    from zofsdp.train import batches

    model = session.model
    model.config._attn_implementation = "eager"
    model.requires_grad_(True)
    names = [n for n, _ in model.named_parameters()]
    draw = batches(session.splits.train, session.cfg.train.batch_size, seed)
    sums, per_batch = [None, None], []  # gradient sums over the even and the odd batches
    for index in range(num_batches):
        out = batch_tensors(session, next(draw), seed * 1000 + index, probes)
        grad, half = out.pop("grad"), index % 2
        sums[half] = grad if sums[half] is None else [a.add_(b) for a, b in zip(sums[half], grad)]
        per_batch.append(out)
        log.info("landscape: batch %d/%d", index + 1, num_batches)
    model.requires_grad_(False)
    groups = {name: group for name, _, group in session.backend.blocks()}
    return {"names": names, "groups": [groups[n] for n in names],
            "n": [p.numel() for p in model.parameters()],
            "grad_sq": torch.stack([b["grad_sq"] for b in per_batch]),
            "hutchinson": torch.stack([b["hutchinson"] for b in per_batch]),
            "fisher": torch.stack([b["fisher"] for b in per_batch]),
            "mean_grad_sq": _per_tensor((a + b) / num_batches for a, b in zip(*sums)),
            "half_grad_sq": torch.stack([_per_tensor(x / len(range(h, num_batches, 2)) for x in sums[h])
                                         for h in (0, 1)])}


def block_stats(raw: dict, unit_of: list[int], num_units: int, half: int | None = None) -> dict:
    """Per-unit estimates from `measure`'s per-tensor figures (units: the tensors themselves, or layers).

    N batches: G = ‖ḡ‖² − V/N (unbiased for ‖E g‖², clipped at 0), V = N/(N−1)·(mean ‖g̃‖² − ‖ḡ‖²); the
    Hessian and Fisher traces are batch means with their standard errors over batches (the probe and the
    batch-to-batch variation both in them). `half` = 0 or 1: from the even or the odd batches only."""
    rows = slice(None) if half is None else slice(half, None, 2)
    mean_sq = raw["mean_grad_sq"] if half is None else raw["half_grad_sq"][half]
    onehot = torch.zeros(len(unit_of), num_units, dtype=torch.float64)
    onehot[torch.arange(len(unit_of)), torch.tensor(unit_of)] = 1.0
    grad_sq, mean_sq = raw["grad_sq"][rows] @ onehot, mean_sq @ onehot
    hess, fisher = raw["hutchinson"][rows].mean(1) @ onehot, raw["fisher"][rows] @ onehot
    num = grad_sq.shape[0]
    noise = ((grad_sq.mean(0) - mean_sq) * num / (num - 1)).clamp_min(0)  # ≥ 0 but for rounding
    return {"n": (torch.tensor(raw["n"], dtype=torch.float64) @ onehot).tolist(),
            "energy": (mean_sq - noise / num).clamp_min(0).tolist(), "noise": noise.tolist(),
            "energy_biased": mean_sq.tolist(),
            "hessian_trace": hess.mean(0).tolist(), "hessian_trace_se": (hess.std(0) / num**0.5).tolist(),
            "fisher_trace": fisher.mean(0).tolist(), "fisher_trace_se": (fisher.std(0) / num**0.5).tolist()}


def _blocks(stats: dict, curvature_key: str, use: torch.Tensor) -> Blocks:
    pick = lambda key: torch.tensor(stats[key], dtype=torch.float64)[use]
    return Blocks.of(pick("n"), pick(curvature_key), pick("energy"), pick("noise"))


def what_a_sampler_can_buy(stats: dict, curvature_key: str, halves: tuple[dict, dict]) -> dict:
    """For one curvature measure: how G_b/a_b spreads, the best ratio to dense MeZO that any block sampler
    reaches (no budget, and at each q), and what uniform sampling at q costs (F1). Blocks whose measured
    trace is not positive (over all batches or either half) are left out of the formulas (`left_out`).

    The best π is fitted to noisy G, V and a, so its in-sample ratio is biased up. `held_out`: π and α
    fitted on the even batches, the ratio evaluated on the odd ones, and the other way round (mean)."""
    use = torch.ones(len(stats["n"]), dtype=torch.bool)
    for source in (stats, *halves):
        use &= torch.tensor(source[curvature_key]) > 0
    counts = {"left_out": int((~use).sum()), "blocks": int(use.sum()), "used": use.tolist()}
    if float(torch.tensor(stats["energy"])[use].sum()) <= 0:  # nothing left to sample
        return {**counts, "resolved": False}
    blocks = _blocks(stats, curvature_key, use)
    parts = [_blocks(h, curvature_key, use) if sum(h["energy"]) > 0 else None for h in halves]
    per_block = blocks.energy / blocks.trace
    out = {**counts, "resolved": True,
           "energy_over_trace": spread(per_block[per_block > 0]),
           "rank_correlation_energy_trace": rank_correlation(blocks.energy, blocks.trace),
           "noise_share": float(blocks.noise.sum() / blocks.total_energy.sum()),
           "uniform": {str(q): uniform_ratio(blocks, q) for q in BUDGETS},
           "best": {}, "held_out": {}}
    for q in (None, *BUDGETS):
        key = "none" if q is None else str(q)
        out["best"][key] = _trim(best_over_alphas(blocks, budget=q))
        out["held_out"][key] = _held_out(parts, q)
    return out


def _held_out(parts: list[Blocks | None], budget: float | None) -> dict:
    """Fit π and α on one half, judge them on the other, both ways. None where a half resolved no gradient
    energy (every G_b ≤ its noise correction: too few batches)."""
    if None in parts:
        return {"ratio": None, "even_to_odd": None, "odd_to_even": None}
    crossed = []
    for fit, check in ((parts[0], parts[1]), (parts[1], parts[0])):
        best = best_over_alphas(fit, budget=budget)
        crossed.append(float(ratio_to_dense(check, torch.tensor(best["pi"], dtype=torch.float64), best["alpha"])))
    return {"ratio": sum(crossed) / 2, "even_to_odd": crossed[0], "odd_to_even": crossed[1]}


def _trim(best: dict) -> dict:
    """π in full for a few dozen blocks (layers); quantiles only for hundreds (tensors)."""
    pi = torch.tensor(best.pop("pi"), dtype=torch.float64)
    if len(pi) <= 64:
        best["pi"] = pi.tolist()
    best["pi_quantiles"] = torch.quantile(pi, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    return best


def summarise(raw: dict) -> dict:
    """Per-tensor and per-layer tables (the sampler's `tensor` and `layer` units, sampling.build_units) and
    what a sampler can buy with either curvature measure."""
    from zofsdp.optim.sampling import build_units

    out = {}
    specs = list(zip(raw["names"], raw["n"], raw["groups"]))
    for granularity in ("tensor", "layer"):
        units = build_units(specs, granularity)
        unit_of = [units.unit_of[name] for name in raw["names"]]
        stats = block_stats(raw, unit_of, len(units.names))
        halves = tuple(block_stats(raw, unit_of, len(units.names), half) for half in (0, 1))
        out[granularity] = {"names": units.names, **stats,
                            "hessian": what_a_sampler_can_buy(stats, "hessian_trace", halves),
                            "fisher": what_a_sampler_can_buy(stats, "fisher_trace", halves)}
    return out


def section_landscape(args) -> dict:
    from zofsdp.measure.common import run_config
    from zofsdp.train import setup

    sizes = QUICK if args.quick else FULL
    cfg = run_config(args, "parallel.backend=none", f"data.num_train={args.batch_size * sizes['batches']}")
    session = setup(cfg)
    start = time.perf_counter()
    try:
        raw = measure(session, sizes["batches"], sizes["probes"], seed=cfg.train.seed)
    finally:
        session.backend.close()
    seconds = time.perf_counter() - start
    # the per-batch figures, so that the analysis can be redone without the autograd passes
    raw_path = Path(args.out) / "landscape_raw.pt"
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw, raw_path)
    return {"landscape": {"batches": sizes["batches"], "probes_per_batch": sizes["probes"],
                          "fisher_probes_per_batch": 1, "measure_s": seconds, "raw": str(raw_path),
                          **summarise(raw)}}


# ----------------------------------------------------------------------------------- report


def _maybe(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"


def _ratio_cell(best: dict) -> str:
    return f"{best['ratio']:.3f} (α {best['alpha']:g}, kept {best['kept_fraction']:.2f})"


def markdown_rows(results: dict) -> list[str]:
    land = results["landscape"]
    lines = [(f"Landscape ({results['model']}, {land['batches']} batches of {results['batch_size']}, "
              f"{land['probes_per_batch']} Hutchinson + 1 Fisher probe per batch, {land['measure_s']:.0f} s): "
              "per-step decrease of the best block sampler and of uniform sampling, relative to dense MeZO "
              "(each at its best lr; > 1 = fewer forward passes)."), "",
             "| unit | curvature | blocks (trace ≤ 0 left out) | G/a p90/p10 | G/a max/min | Spearman(G, a) | "
             "noise share of Δ² | best, no budget | HT (α = 1) | held out | best at q = " +
             " / ".join(map(str, BUDGETS)) + " | held out | uniform at q = " + " / ".join(map(str, BUDGETS)) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for unit in ("tensor", "layer"):
        for kind in ("hessian", "fisher"):
            v = land[unit][kind]
            if not v["resolved"]:
                lines.append(f"| {unit} | {kind} | {v['blocks']} ({v['left_out']}) | no positive trace with gradient "
                             "energy: not resolved |" + " |" * 9)
                continue
            best = " / ".join(f"{v['best'][str(q)]['ratio']:.3f}" for q in BUDGETS)
            held = " / ".join(_maybe(v["held_out"][str(q)]["ratio"]) for q in BUDGETS)
            uniform = " / ".join(f"{v['uniform'][str(q)]:.3f}" for q in BUDGETS)
            lines.append(f"| {unit} | {kind} | {v['blocks']} ({v['left_out']}) | "
                         f"{v['energy_over_trace']['p90_over_p10']:.3g} | {v['energy_over_trace']['max_over_min']:.3g} | "
                         f"{v['rank_correlation_energy_trace']:.2f} | {v['noise_share']:.2f} | "
                         f"{_ratio_cell(v['best']['none'])} | {v['best']['none']['ratio_by_alpha']['1.0']:.3f} | "
                         f"{_maybe(v['held_out']['none']['ratio'])} | {best} | {held} | {uniform} |")
    layer = land["layer"]
    lines += ["", "Per layer (G = ‖E g‖², V = E‖g̃ − g‖² at this batch, traces ± standard error):", "",
              "| layer | n | G | V | tr H | Fisher trace | G / tr H |", "|---|---|---|---|---|---|---|"]
    for i, name in enumerate(layer["names"]):
        h = layer["hessian_trace"][i]
        ratio = f"{layer['energy'][i] / h:.3g}" if h > 0 else "-"
        lines.append(f"| {name} | {layer['n'][i]:,.0f} | {layer['energy'][i]:.3g} | {layer['noise'][i]:.3g} | "
                     f"{h:.3g} ± {layer['hessian_trace_se'][i]:.2g} | {layer['fisher_trace'][i]:.3g} ± "
                     f"{layer['fisher_trace_se'][i]:.2g} | {ratio} |")
    return lines + [""]


def plot(results: dict, folder: Path) -> list[Path]:
    """landscape.png: per layer G, V, tr H and the Fisher trace; and the per-step ratio to dense MeZO
    against the budget q, uniform (F1, a curve) and the best sampler (points), per unit and curvature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    land = results["landscape"]
    layer = land["layer"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = list(range(len(layer["names"])))
    hess = torch.tensor(layer["hessian_trace"])
    left.plot(x, layer["energy"], "o-", label="G = ‖E g‖²")
    left.plot(x, layer["noise"], ".:", label=f"V (batch {results['batch_size']})")
    left.errorbar([i for i in x if hess[i] > 0], hess[hess > 0].tolist(),
                  yerr=[layer["hessian_trace_se"][i] for i in x if hess[i] > 0], fmt="s-", label="tr H (Hutchinson)")
    if bool((hess <= 0).any()):
        left.plot([i for i in x if hess[i] <= 0], (-hess[hess <= 0]).tolist(), "kx", label="−tr H where < 0")
    left.plot(x, layer["fisher_trace"], "^-", label="Fisher trace")
    left.set_yscale("log")
    left.set_xticks(x[::4], [layer["names"][i].replace("layers.", "") for i in x[::4]])
    left.set_xlabel("layer (embed, 0..L−1, head)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    grid, budgets = [i / 100 for i in range(2, 101)], [*BUDGETS, 1.0]
    colours = {("tensor", "fisher"): "tab:blue", ("layer", "fisher"): "tab:cyan",
               ("tensor", "hessian"): "tab:red", ("layer", "hessian"): "tab:orange"}
    for (unit, kind), colour in colours.items():
        v = land[unit][kind]
        if not v["resolved"]:
            continue
        blocks = _blocks(land[unit], f"{kind}_trace", torch.tensor(v["used"]))
        best = [v["best"][str(q)] for q in BUDGETS] + [v["best"]["none"]]
        right.plot(grid, [uniform_ratio(blocks, q) for q in grid], "-" if kind == "fisher" else ":",
                   color=colour, alpha=0.7, label=f"{unit}, {kind}: uniform (F1)")
        right.plot(budgets, [b["ratio"] for b in best], "o--", color=colour, label=f"{unit}, {kind}: best, any α")
        right.plot(budgets, [b["ratio_by_alpha"]["1.0"] for b in best], "x", color=colour, markersize=9,
                   label=f"{unit}, {kind}: best HT (α = 1)")
    right.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("budget q (kept fraction of the parameters; 1.0 = no budget)")
    right.set_ylabel("one-step decrease / dense MeZO's")
    right.legend(fontsize=7, loc="upper left")
    right.grid(alpha=0.3)
    fig.suptitle(f"{results['model']} on SST-2: gradient energy and curvature, and what a block sampler can buy")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "landscape.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
