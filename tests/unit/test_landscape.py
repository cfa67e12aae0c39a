"""The review's one-step formulas (zofsdp.measure.landscape): closed forms, the review's three cases, and a
Monte-Carlo check that the formula's E L(θ − ηĝ) is what random masks, probes and minibatch noise give."""

from __future__ import annotations

import pytest
import torch

from zofsdp.errors import UserError
from zofsdp.measure.landscape import (
    ALPHAS,
    BUDGETS,
    Blocks,
    best_lr,
    best_sampler,
    loss_change,
    project,
    ratio_to_dense,
    uniform_ratio,
)

F64 = torch.float64


def project_quadratic() -> Blocks:
    """The project's quadratic (tests/unit/sparse_problems.py): 10 blocks × 4 coordinates, h_b = 2^{−b},
    θ = 1, so g_b = h_b·1 and G_b = 4·h_b²."""
    h = torch.tensor([2.0**-b for b in range(10)], dtype=F64)
    return Blocks.of([4] * 10, 4 * h, 4 * h * h)


def test_f1_closed_form_is_the_general_formula_at_uniform_pi():
    g = torch.Generator().manual_seed(3)
    blocks = Blocks.of(torch.randint(1, 50, (12,), generator=g), torch.rand(12, generator=g, dtype=F64) + 0.1,
                       torch.rand(12, generator=g, dtype=F64), torch.rand(12, generator=g, dtype=F64))
    for q in (0.1, 0.3, 0.77):
        for alpha in ALPHAS:
            general = float(ratio_to_dense(blocks, torch.full((12,), q, dtype=F64), alpha))
            assert general == pytest.approx(uniform_ratio(blocks, q), rel=1e-12)
    assert uniform_ratio(blocks, 1.0) == pytest.approx(1.0)


def test_f1_reproduces_the_quadratics_161_passes_against_mezos_72():
    """docs/optimizers.md measured MeZO at 72 forward passes and CurvZO (q ≈ 0.3) at 161, each at its best lr."""
    ratio = uniform_ratio(project_quadratic(), 0.3)
    assert ratio == pytest.approx(0.447, abs=5e-4)
    assert round(72 / ratio) == 161


def test_f2_aligned_curvature_makes_dense_optimal():
    """a_b ∝ G_b (the Fisher picture): no π beats π ≡ 1, for any α, with or without minibatch noise."""
    g = torch.Generator().manual_seed(0)
    energy = torch.exp(2 * torch.randn(30, generator=g, dtype=F64))
    n = torch.randint(10, 1000, (30,), generator=g)
    for noise in (None, 5 * energy):
        blocks = Blocks.of(n, 3 * energy, energy, noise)
        for alpha in ALPHAS:
            best = best_sampler(blocks, alpha)
            assert best["ratio"] == pytest.approx(1.0, abs=1e-9)
            assert min(best["pi"]) == pytest.approx(1.0)


def test_f3_sharp_blocks_with_little_gradient_let_a_sparse_sampler_win_31_6x():
    """10 sharp blocks (h = 1, G = 0.01 each) and 10 flat ones (h = 1e-3, G = 1 each), 1000 coordinates
    each: keep the sharp blocks, probe the flat ones rarely (π ≈ 0.01) with big HT steps."""
    n = 1000
    blocks = Blocks.of([n] * 20, [n * 1.0] * 10 + [n * 1e-3] * 10, [0.01] * 10 + [1.0] * 10)
    best = best_sampler(blocks, 1.0)
    assert best["ratio"] == pytest.approx(31.6, abs=0.2)
    assert best["lr_over_dense"] == pytest.approx(best["ratio"], rel=1e-9)  # HT: same gain, so η* ∝ D
    assert best["kept_fraction"] == pytest.approx(0.5, abs=0.01)  # "at half the parameters"
    assert all(p == pytest.approx(1.0) for p in best["pi"][:10])
    assert all(0.01 <= p < 0.012 for p in best["pi"][10:])
    # the review's rule π ∝ √(a_b/G_b), capped at 1, is already near the optimum
    rule = (blocks.trace / blocks.energy).sqrt()
    assert float(ratio_to_dense(blocks, (rule / rule.max()).clamp(0.01, 1), 1.0)) > 0.95 * best["ratio"]
    # a budget below the sharp blocks' mass forces them out and costs most of the gain
    assert best_sampler(blocks, 1.0, budget=0.3)["ratio"] < best["ratio"]


def test_project_meets_box_and_budget():
    n = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=F64)
    pi = project(torch.tensor([2.0, 0.9, 0.5, 0.3], dtype=F64), n, 0.05, mass=0.3 * float(n.sum()))
    assert float((n * pi).sum()) == pytest.approx(0.3 * float(n.sum()), rel=1e-9)
    assert bool((pi >= 0.05).all()) and bool((pi <= 1).all())
    assert pi[0] == 1.0 and float(pi[3]) < 0.3  # the budget shifts every unclipped π by the same amount
    loose = project(torch.tensor([2.0, 0.9, 0.5, 0.01], dtype=F64), n, 0.05, mass=0.3 * float(n.sum()))
    assert loose.tolist() == [1.0, 0.9, 0.5, 0.05]  # a budget that is not binding only clips to the box


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="positive curvature"):
        Blocks.of([4, 4], [1.0, -0.5], [1.0, 1.0])
    with pytest.raises(UserError, match="one entry per block"):
        Blocks.of([4, 4], [1.0], [1.0, 1.0])


def simulated_loss_change(n, h, theta, sigma, pi, alpha, lr, draws, seed) -> tuple[float, float]:
    """(mean, standard error) of L(θ − ηĝ) − L(θ) over random masks, probes z and minibatch noise ξ, with
    L = ½Σ h_b‖θ_b‖², ĝ_b = π_b^{−α}·m_b·Δ·z_b and Δ the two-sided difference of the noisy loss L + ξᵀθ."""
    g = torch.Generator().manual_seed(seed)
    block = torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n))
    h_c, pi_c, sigma_c = h[block], pi[block], sigma[block]

    def loss(x, xi=None):
        value = 0.5 * (h_c * x * x).sum(-1)
        return value if xi is None else value + (xi * x).sum(-1)

    changes = []
    for _ in range(draws // 50_000):
        keep = (torch.rand(50_000, len(n), generator=g, dtype=F64) < pi).double()[:, block]
        z = torch.randn(50_000, len(block), generator=g, dtype=F64)
        xi = sigma_c * torch.randn(50_000, len(block), generator=g, dtype=F64)
        u, eps = keep * z, 1e-3
        delta = (loss(theta + eps * u, xi) - loss(theta - eps * u, xi)) / (2 * eps)
        step = pi_c.pow(-alpha) * keep * delta[:, None] * z
        changes.append(loss(theta - lr * step) - loss(theta))
    changes = torch.cat(changes)
    return float(changes.mean()), float(changes.std() / len(changes) ** 0.5)


def test_formula_matches_monte_carlo_masks_probes_and_minibatch_noise():
    n = [3, 5, 2, 6]
    h = torch.tensor([1.0, 0.3, 0.05, 0.6], dtype=F64)
    theta = torch.tensor([0.5, -1.0, 2.0, 1.5, -0.3, 0.8, 1.2, -2.0, 0.7, 0.1, -0.4, 0.9, 1.1, -0.6, 0.2, 0.5],
                         dtype=F64)
    sigma = torch.tensor([0.6, 0.3, 1.0, 0.5], dtype=F64)
    pi = torch.tensor([0.9, 0.4, 0.2, 0.7], dtype=F64)
    block = torch.repeat_interleave(torch.arange(4), torch.tensor(n))
    energy = torch.zeros(4, dtype=F64).index_add_(0, block, (h[block] * theta) ** 2)
    blocks = Blocks.of(n, h * torch.tensor(n), energy, torch.tensor(n) * sigma**2)
    no_noise = Blocks.of(n, blocks.trace, energy)
    for alpha in ALPHAS:
        lr = float(best_lr(blocks, pi, alpha))  # where the η² term (the one noise enters) is half the gain
        mean, se = simulated_loss_change(n, h, theta, sigma, pi, alpha, lr, draws=400_000, seed=int(10 * alpha))
        predicted = float(loss_change(blocks, pi, alpha, lr))
        assert abs(mean - predicted) < 4 * se, (alpha, mean, predicted, se)
        assert se < 0.05 * abs(predicted)  # the check has power: the noise-free formula is far off
        assert abs(mean - float(loss_change(no_noise, pi, alpha, lr))) > 20 * se


def test_fisher_probe_averages_to_the_exact_gauss_newton_trace():
    """E over the random signs of ‖∇f‖² = (1/B)·Σ_i Σ_k p_ik·‖∇(s_ik − p_iᵀs_i)‖², checked on a linear
    scorer with one padded candidate (its p is 0, it must not count)."""
    from zofsdp.measure.landscape import _fisher

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 5, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(4, 5, generator=g, dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True], [True, True, False]])
    scores = (x @ weight.T).masked_fill(~mask, float("-inf"))
    rows = type("Rows", (), {"candidate_mask": mask, "__len__": lambda self: 4})()
    p = torch.softmax(scores, dim=1).detach()
    exact = 0.0
    for i in range(4):
        for k in range(3):
            if mask[i, k]:
                centred = scores[i, k] - (p[i, mask[i]] * scores[i, mask[i]]).sum()
                (grad,) = torch.autograd.grad(centred, weight, retain_graph=True)
                exact += float(p[i, k]) * float(grad.square().sum()) / 4
    samples = torch.stack([_fisher(scores, rows, [weight], g)[0] for _ in range(4000)])
    assert float(samples.mean()) == pytest.approx(exact, abs=4 * float(samples.std()) / 4000**0.5)
    assert float(samples.std()) / 4000**0.5 < 0.05 * exact


def test_bench_landscape_section_on_the_tiny_model(tmp_path):
    """`zofsdp bench --quick --sections landscape`: per-tensor and per-layer tables with the sampler's units,
    finite figures, and a best sampler at least as good as the feasible points it must beat."""
    import json

    from tests.conftest import run_cli

    out = tmp_path / "bench.json"
    run_cli(["bench", "--quick", "--threads", "1", "--json", str(out), "--plot", str(tmp_path),
             "--out", str(tmp_path / "runs"), "--sections", "landscape"], timeout=600)
    land = json.loads(out.read_text())["landscape"]
    assert land["layer"]["names"] == ["embed", "layers.0", "layers.1", "head"]
    assert sum(land["layer"]["n"]) == sum(land["tensor"]["n"]) == 3_219_776  # tiny-llama's parameters
    for unit in ("tensor", "layer"):
        stats = land[unit]
        assert len(stats["names"]) == len(stats["energy"]) == len(stats["hessian_trace_se"])
        assert min(stats["energy"]) >= 0 and min(stats["noise"]) >= 0 and min(stats["fisher_trace"]) > 0
        for kind in ("hessian", "fisher"):
            v = stats[kind]
            assert v["blocks"] + v["left_out"] == len(stats["names"]) == len(v["used"])
            if not v["resolved"]:  # the random tiny model's Hessian traces can all be negative somewhere
                assert kind == "hessian"
                continue
            assert v["best"]["none"]["ratio"] >= 1 - 1e-9  # dense is a feasible π
            for q in BUDGETS:
                best = v["best"][str(q)]
                assert best["ratio"] >= v["uniform"][str(q)] - 1e-9  # uniform π = q is feasible
                assert best["kept_fraction"] <= q + 1e-9
            for held in v["held_out"].values():  # π fitted on half the batches, judged on the other half
                assert 0 < held["even_to_odd"] < float("inf") and 0 < held["odd_to_even"] < float("inf")
    assert (tmp_path / "landscape.png").stat().st_size > 10_000
    raw = torch.load(land["raw"])  # the per-batch figures the tables came from
    assert raw["hutchinson"].shape == (8, 1, len(land["tensor"]["names"]))
    assert raw["half_grad_sq"].shape == (2, len(land["tensor"]["names"]))
