"""Small synthetic problems for the sparse-optimizer unit tests: `Shard`s built directly on tensors."""

from __future__ import annotations

import math

import torch

from zofsdp.config import ZOConfig
from zofsdp.noise import Shard, block_id


class Quadratic:
    """L(θ) = ½ Σ_b h_b ‖θ_b‖², one block (= one tensor, one layer) per entry of `sizes`.

    The central difference of a quadratic is exact, so Δ = uᵀ∇L up to float64 rounding.
    """

    def __init__(self, sizes: list[int], curvature: list[float], dtype=torch.float64, start: list[float] | None = None):
        """`start`: θ's value in each block (default 1 everywhere)."""
        start = start or [1.0] * len(sizes)
        self.theta = torch.cat([torch.full((n,), v, dtype=dtype) for n, v in zip(sizes, start)])
        self.h = torch.cat([torch.full((n,), c, dtype=dtype) for n, c in zip(sizes, curvature)])
        self.params = list(self.theta.split(sizes))  # views: the shards edit theta in place
        names = [f"model.layers.{i}.weight" for i in range(len(sizes))]
        self.shards = [Shard(name, p, 0, p.numel(), block_id(name), False, f"layers.{i}")
                       for i, (name, p) in enumerate(zip(names, self.params))]

    def loss(self) -> float:
        return float(0.5 * (self.h * self.theta * self.theta).sum())

    def grad(self) -> torch.Tensor:
        return self.h * self.theta

    def flat(self) -> torch.Tensor:
        return self.theta.clone()

    def load(self, flat: torch.Tensor) -> None:
        self.theta.copy_(flat)


def zo_config(**kw) -> ZOConfig:
    kw.setdefault("eps", 1e-3)
    kw.setdefault("chunk_numel", 1024)
    return ZOConfig(**kw)


def estimates(opt, problem: Quadratic, num_draws: int, first_step: int = 1, on_step=None) -> torch.Tensor:
    """ĝ of `num_draws` steps, each taken from the same θ (reset after the step): [num_draws, d].

    With lr = 1, ĝ = θ_before − θ_after; the optimizer's own state (scores, rewards) keeps evolving.
    """
    theta = problem.flat()
    out = torch.empty(num_draws, theta.numel(), dtype=torch.float64)
    for i in range(num_draws):
        if on_step is not None:
            on_step(opt)
        opt.step(problem.loss, first_step + i)
        out[i] = (theta - problem.flat()) / opt.cfg.lr
        problem.load(theta)
    return out


def chi_square(draws: torch.Tensor, truth: torch.Tensor) -> float:
    """Σ_i ((mean_i − truth_i) / SE_i)²: ~χ²(d) when the estimator is unbiased."""
    se = draws.std(dim=0) / math.sqrt(draws.shape[0])
    return float((((draws.mean(dim=0) - truth) / se) ** 2).sum())


def f3_quadratic(blocks: int = 10, size: int = 1) -> Quadratic:
    """The review's F3 counterexample: `blocks` sharp blocks (h = 1) with little gradient (θ = 0.01) and as
    many flat blocks (h = 1e-3) holding it (θ = 100), `size` coordinates each: G_sharp/G_flat = 0.01."""
    return Quadratic([size] * 2 * blocks, [1.0] * blocks + [1e-3] * blocks, start=[0.01] * blocks + [100.0] * blocks)


def passes_to_target(opt, problem: Quadratic, target: float, max_steps: int) -> int:
    """Forward passes (ℓ₀ included) until the loss is below `target`; max_steps·3 + 1 if never (diverged
    or too slow), so a failure always ranks last."""
    passes = 0
    for step in range(1, max_steps + 1):
        record = opt.step(problem.loss, step)
        passes += record["forward_passes"]
        loss = problem.loss()
        if loss < target:
            return passes
        if not math.isfinite(loss) or loss > 1e3 * target:
            break
    return 3 * max_steps + 1
