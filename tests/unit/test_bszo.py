"""BSZO / BSZO-B: the Kalman posterior against its closed form, Cor. 3.6, the expected step, the cache
equivalence of BSZO and BSZO-B, forward counts and the skip on a non-finite loss."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.sparse_problems import Quadratic, chi_square, estimates, zo_config
from zofsdp.config import BSZOConfig
from zofsdp.optim.bszo import BSZO, BSZO_B, SubspaceKalman


def test_sequential_kalman_equals_batch_posterior():
    """Eq. 9: Σ = (σ_p⁻²I + DᵀR⁻¹D)⁻¹, μ = ΣDᵀR⁻¹Y with R = diag(σ_e²‖d‖²), for arbitrary directions."""
    torch.manual_seed(0)
    k, m, prior_var, noise_var = 3, 7, 2.0, 0.3
    d, y = torch.randn(m, k, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    kalman = SubspaceKalman(k, prior_var, jitter=0.0)
    for row, obs in zip(d, y.tolist()):
        kalman.update(row, obs, noise_var)
    r_inv = torch.diag(1 / (noise_var * (d * d).sum(1)))
    cov = torch.linalg.inv(torch.eye(k, dtype=torch.float64) / prior_var + d.T @ r_inv @ d)
    assert torch.allclose(kalman.cov, cov, rtol=1e-12, atol=1e-14)
    assert torch.allclose(kalman.mean, cov @ d.T @ r_inv @ y, rtol=1e-12, atol=1e-14)
    # the code's jitter (1e-10·I per observation) moves it by no more than that
    jittered = SubspaceKalman(k, prior_var)
    for row, obs in zip(d, y.tolist()):
        jittered.update(row, obs, noise_var)
    assert torch.allclose(jittered.cov, cov, atol=m * 1e-10)


def test_adaptive_axis_is_the_largest_variance_first_on_ties():
    kalman = SubspaceKalman(3, 1.0, jitter=0.0)
    assert kalman.adaptive_axis() == 0  # all tied: the first axis
    kalman.update(torch.tensor([1.0, 0, 0], dtype=torch.float64), 0.5, 1.0)
    assert kalman.adaptive_axis() == 1


def fixed_noise(prior: float, noise: float, k: int = 2, m: int = 2) -> BSZOConfig:
    return BSZOConfig(subspace_dim=k, num_samples=m, prior_std=prior, noise_std_init=noise, adaptive_noise=False)


def directions(opt, step: int, k: int) -> torch.Tensor:
    return torch.stack([torch.cat([opt.noise.slice(s, (step, i)) for s in opt.shards]).double() for i in range(k)])


@pytest.mark.parametrize("prior, noise", [(1.0, 0.5), (1.0, 1e-6)])
def test_update_is_gamma_times_one_sided_differences(prior, noise):
    """Cor. 3.6 (axes, m = k, fixed σ_e): μ = γY, γ = σ_p²/(σ_p² + σ_e²); σ_e → 0 gives μ = Y, k-direction
    one-sided SPSA. Checked on the weights: Δθ = −η Σ_i γ y_i z_i with y_i from the losses themselves."""
    problem = Quadratic([300, 200], [1.0, 3.0])
    lr, eps, k = 0.01, 1e-3, 3
    opt = BSZO(problem.shards, zo_config(lr=lr, eps=eps, bszo=fixed_noise(prior, noise, k, k)), seed=4)
    theta, base = problem.flat(), problem.loss()
    z = directions(opt, 7, k)
    ys = []
    for zi in z:
        problem.load(theta + (eps * zi).float().to(torch.bfloat16).double())  # d = bf16(εz), as probed
        ys.append((problem.loss() - base) / eps)
    problem.load(theta)
    record = opt.step(problem.loss, 7)
    gamma = prior**2 / (prior**2 + noise**2)
    expected = theta - lr * gamma * (torch.tensor(ys, dtype=torch.float64) @ z)
    assert record["forward_passes"] == k + 1
    assert torch.allclose(problem.flat(), expected, rtol=0, atol=1e-9)


def test_expected_step_is_gamma_k_gradient():
    """Thm 3.7 on a quadratic: E[Δθ]/η = γ·k·∇L (one-sided differences are unbiased here: the O(ε) term
    is odd in z). χ² over d = 12 coordinates, 3000 draws; ∇L alone (no γk) must fail it."""
    problem = Quadratic([4, 4, 4], [0.5, 1.0, 2.0])
    k, prior, noise = 2, 1.0, 0.7
    opt = BSZO(problem.shards, zo_config(lr=1.0, bszo=fixed_noise(prior, noise, k, k)), seed=1)
    draws = estimates(opt, problem, 3000)
    gamma = prior**2 / (prior**2 + noise**2)
    d = draws.shape[1]
    limit = d + 5 * math.sqrt(2 * d)
    assert chi_square(draws, gamma * k * problem.grad()) < limit
    assert chi_square(draws, problem.grad()) > 3 * limit


def run(cls, steps: int, **bszo) -> tuple[torch.Tensor, list[int]]:
    problem = Quadratic([500, 300], [1.0, 4.0])
    problem.load(problem.flat() * 1.5)  # inside [1, 2): no probe crosses a power of two, restores are exact
    bszo.setdefault("prior_std", 1.0)  # γ ≈ 1 at first: steps that matter
    opt = cls(problem.shards, zo_config(lr=0.05, eps=1e-3, bszo=BSZOConfig(**bszo)), seed=2)
    counts = []
    for step in range(1, steps + 1):
        calls = []

        def loss(calls=calls) -> float:
            calls.append(1)
            return problem.loss()

        assert opt.step(loss, step)["forward_passes"] == len(calls)
        counts.append(len(calls))
    return problem.flat(), counts


def test_bszo_b_equals_bszo_when_forwards_are_deterministic():
    """The authors' own check (scripts/test_v3_v4_equivalence.sh): with exact restores and a deterministic
    loss, BSZO-B's fresh forward returns the cached value, so the weights agree. 3 vs 4 forwards per step."""
    cached, n_cached = run(BSZO, 10)
    fresh, n_fresh = run(BSZO_B, 10)
    assert n_cached == [3] * 10 and n_fresh == [4] * 10
    assert torch.equal(cached, fresh)
    assert (cached - 1.5).abs().max() > 1e-3  # it moved


def test_forward_count_follows_k_and_m():
    _, counts = run(BSZO, 2, subspace_dim=3, num_samples=6)
    assert counts == [4, 4]
    _, counts = run(BSZO_B, 2, subspace_dim=3, num_samples=6)
    assert counts == [7, 7]


def test_adaptive_noise_tracks_the_residuals_and_survives_a_checkpoint():
    """σ_e² follows the EMA of squared residuals: on a steep quadratic (y² ≫ σ_p² = 1e-6·n) it rises
    far above its start and the step shrinks (γ < 1). The EMA is the state a checkpoint carries."""
    problem = Quadratic([500, 300], [100.0, 400.0])
    opt = BSZO(problem.shards, zo_config(lr=1e-4, eps=1e-3), seed=0)
    start = opt.residual_sq_ema
    assert start == pytest.approx(800 / 1e6)
    for step in range(1, 4):
        opt.step(problem.loss, step)
    assert opt.residual_sq_ema > 1e3 * start
    other = BSZO(problem.shards, zo_config(lr=1e-4, eps=1e-3), seed=0)
    other.load_state_dict(opt.state_dict())
    assert other.residual_sq_ema == opt.residual_sq_ema
    with pytest.raises(ValueError, match="bszo"):
        BSZO_B(problem.shards, zo_config(), seed=0).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("cls", [BSZO, BSZO_B])
def test_non_finite_loss_restores_and_skips(cls):
    problem = Quadratic([300], [1.0], dtype=torch.float32)
    theta = problem.flat()
    opt = cls(problem.shards, zo_config(lr=0.1), seed=0)
    losses = iter([1.0, float("nan"), 2.0, 2.0])
    record = opt.step(lambda: next(losses), 1)
    assert record["skipped"]
    assert torch.allclose(problem.flat(), theta, atol=1e-6)
