"""HiZOO: the paper's diagonal estimate is unbiased, the code's is biased as derived, α = 0 is MeZO, and one
step equals its dense closed form (probes with the old H, update with the new one)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.sparse_problems import Quadratic, chi_square, zo_config
from zofsdp.config import HiZOOConfig
from zofsdp.optim.hizoo import HiZOO, diag_estimate
from zofsdp.optim.mezo import MeZO


def draws_of_estimate(form: str, num: int = 20_000, d: int = 6):
    """Ĥ for L = ½θᵀAθ (dense A) at a random H: ΔL = ε²·xᵀAx with x = z/√H (exact for a quadratic)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = q @ q.T / d + torch.diag(torch.linspace(0.5, 3, d, dtype=torch.float64))
    h = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    z = torch.randn(num, d, generator=gen, dtype=torch.float64)
    eps = 1e-3
    x = z / h.sqrt()
    delta = eps * eps * ((x @ a) * x).sum(1)
    est = torch.stack([diag_estimate(float(dl), h, zi, eps, form) for dl, zi in zip(delta, z)])
    return est, a, h


def test_paper_estimate_is_unbiased_for_the_diagonal():
    """χ² over d = 6 coordinates, 20,000 draws, below d + 5√(2d); the code's form fails the same check."""
    est, a, _ = draws_of_estimate("paper")
    d = est.shape[1]
    limit = d + 5 * math.sqrt(2 * d)
    assert chi_square(est, a.diagonal()) < limit
    code, _, _ = draws_of_estimate("code")
    assert chi_square(code, a.diagonal()) > 10 * limit


def test_code_estimate_has_the_derived_bias():
    """E[code Ĥ_j] = (H_j/2)(Σ_i A_ii/H_i + 2A_jj/H_j) (positive ΔL here: A is positive definite)."""
    est, a, h = draws_of_estimate("code")
    diag = a.diagonal()
    expected = h / 2 * ((diag / h).sum() + 2 * diag / h)
    d = est.shape[1]
    assert chi_square(est, expected) < d + 5 * math.sqrt(2 * d)


def test_zero_smoothing_is_mezo_plus_a_forward():
    """α = 0 keeps H = 1: the same z and weights as MeZO, bit for bit, with 3 forwards instead of 2."""
    runs = []
    for cls, extra in ((MeZO, {}), (HiZOO, {"hizoo": HiZOOConfig(smooth=0.0)})):
        problem = Quadratic([400, 300], [1.0, 3.0], dtype=torch.float32)
        opt = cls(problem.shards, zo_config(lr=0.01, **extra), seed=6)
        counts = []
        for step in range(1, 6):
            counts.append(opt.step(problem.loss, step)["forward_passes"])
        runs.append((problem.flat(), counts))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == [2] * 5 and runs[1][1] == [3] * 5


@pytest.mark.parametrize("form", ["paper", "code"])
def test_one_step_equals_dense_closed_form(form):
    """From a random H: probes ±ε z/√H_old, H_new = H + α(|Ĥ| − H), θ_new = θ − η g z/√H_new."""
    problem = Quadratic([500, 200], [1.0, 4.0])
    lr, eps, alpha = 1e-2, 1e-3, 0.3
    opt = HiZOO(problem.shards, zo_config(lr=lr, eps=eps, hizoo=HiZOOConfig(smooth=alpha, estimator=form)), seed=2)
    gen = torch.Generator().manual_seed(1)
    for h in opt.hessian:
        h.copy_(torch.rand(h.numel(), generator=gen) + 0.5)
    h_old = torch.cat(opt.hessian).double()
    theta = problem.flat()
    z = torch.cat([opt.noise.slice(s, (3, 0)) for s in opt.shards]).double()
    d = (eps * z.float() / h_old.float().sqrt()).to(torch.bfloat16).double()  # the probe's rounded step
    losses = []
    for sign in (1, -1):
        problem.load(theta + sign * d)
        losses.append(problem.loss())
    problem.load(theta)
    base = problem.loss()
    record = opt.step(problem.loss, 3)
    g = (losses[0] - losses[1]) / (2 * eps)
    assert record["projected_grad"] == pytest.approx(g, rel=1e-12)
    est = diag_estimate(losses[0] + losses[1] - 2 * base, h_old, z, eps, form).abs()
    h_new = h_old + alpha * (est - h_old)
    # fp32 arithmetic: z² − 1 near 0 loses ~1e-7 absolute, times ΔL/(2ε²)·H ≈ 660 here
    assert torch.allclose(torch.cat(opt.hessian).double(), h_new, rtol=1e-5, atol=2e-4)
    assert not torch.allclose(torch.cat(opt.hessian).double(), h_old, rtol=1e-2)
    assert torch.allclose(problem.flat(), theta - lr * g * z / h_new.sqrt(), rtol=0, atol=1e-6)
    assert not torch.allclose(problem.flat(), theta - lr * g * z / h_old.sqrt(), rtol=0, atol=1e-6)


def test_small_smoothing_still_moves_h_in_fp32():
    """α = 1e-8: the code's (1 − α)·H is a no-op in fp32; H + α(Ĥ − H) is not."""
    assert torch.equal(torch.ones(1) * (1 - 1e-8), torch.ones(1))
    problem = Quadratic([300], [50.0], dtype=torch.float32)
    opt = HiZOO(problem.shards, zo_config(lr=0.0, eps=1e-3, hizoo=HiZOOConfig(smooth=1e-8)), seed=0)
    opt.step(problem.loss, 1)
    assert not torch.equal(opt.hessian[0], torch.ones(300))


def test_refuses_low_precision_probes_and_checkpoints_without_h():
    problem = Quadratic([300], [1.0], dtype=torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        HiZOO(problem.shards, zo_config(), seed=0, probe=object())
    opt = HiZOO(problem.shards, zo_config(), seed=0)
    with pytest.raises(ValueError, match="Hessian"):
        opt.load_state_dict(opt.state_dict())
    opt.load_state_dict({**opt.state_dict(), "sharded_state_loaded": True})
