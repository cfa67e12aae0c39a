"""AdaLeZO: unbiased inverse-probability estimate, seeded draws, rewards, the clip, skipping."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.sparse_problems import Quadratic, chi_square, estimates, zo_config
from zofsdp.config import AdaLeZOConfig
from zofsdp.optim.adalezo import AdaLeZO, LayerBandit


def test_ip_weighted_estimate_is_unbiased_without_clip():
    """Mean of ĝ over 1500 draws vs ∇L (χ² ≤ d + 5√(2d), d = 12); dropping the weights must fail it."""
    problem = Quadratic([2] * 6, [0.5**i for i in range(6)])
    cfg = zo_config(lr=1.0, adalezo=AdaLeZOConfig(rho=0.34, max_weight=0.0))
    opt = AdaLeZO(problem.shards, cfg, seed=0)
    weights = []

    def record(o):  # the weight each layer will get this step, replayed from the same seeded draw
        probs = o.bandit.probs()
        weights.append(o.bandit.weights(o.bandit.draw(probs, len(weights) + 1), probs).repeat_interleave(2))

    draws = estimates(opt, problem, 1500, on_step=record)
    d = draws.shape[1]
    limit = d + 5 * math.sqrt(2 * d)
    assert chi_square(draws, problem.grad()) < limit
    w = torch.stack(weights)
    unweighted = torch.where(w > 0, draws / w.clamp_min(1e-300), torch.zeros_like(draws))
    assert chi_square(unweighted, problem.grad()) > 10 * limit


def bandit(num_layers: int = 8, **kw) -> LayerBandit:
    blocks = [(f"l{i}.w", 10, f"layers.{i}") for i in range(num_layers)]
    return LayerBandit(blocks, AdaLeZOConfig(**kw), seed=5)


def test_draws_are_seeded_and_sized():
    a, b = bandit(), bandit()
    assert a.k == math.ceil(0.25 * 8)
    for step in range(1, 30):
        ca, cb = a.draw(a.probs(), step), b.draw(b.probs(), step)
        assert torch.equal(ca, cb) and int(ca.sum()) == a.k


def test_rewards_steer_the_distribution_and_gamma_floors_it():
    b = bandit(gamma=0.2, tau=0.5)
    counts = torch.zeros(8, dtype=torch.int64)
    counts[3] = 2
    b.update(counts, reward=4.0)
    other = torch.zeros(8, dtype=torch.int64)
    other[5] = 1
    b.update(other, reward=1.0)
    probs = b.probs()
    assert abs(float(probs.sum()) - 1) < 1e-12
    assert int(probs.argmax()) == 3
    assert float(probs.min()) >= 0.2 / 8
    assert float(probs[3] / probs[5]) <= math.exp(1 / 0.5)  # max-normalised rewards bound the ratio


def test_weight_clip():
    b = bandit(gamma=1.0, max_weight=2.0)  # uniform p = 1/8, k = 2
    counts = torch.tensor([2, 0, 0, 0, 0, 0, 0, 0])
    assert b.weights(counts, b.probs()).tolist()[0] == 2.0  # 2 / (2 · 1/8) = 8, clipped
    assert bandit(gamma=1.0, max_weight=0.0).weights(counts, b.probs()).tolist()[0] == 8.0


def test_undrawn_layers_are_untouched_and_generate_no_noise():
    problem = Quadratic([2500] * 8, [1.0] * 8, dtype=torch.float32)
    opt = AdaLeZO(problem.shards, zo_config(lr=1e-2), seed=3)
    for step in range(1, 6):
        drawn = opt.bandit.draw(opt.bandit.probs(), step) > 0
        before = [p.clone() for p in problem.params]
        chunks = opt.noise.num_chunks_generated
        record = opt.step(problem.loss, step)
        assert opt.noise.num_chunks_generated - chunks == 3 * 3 * int(drawn.sum())
        assert record["keep_fraction"] == int(drawn.sum()) / 8
        for d, old, new in zip(drawn.tolist(), before, problem.params):
            assert torch.equal(old, new) != d


def test_public_preset_fills_the_fields_left_at_our_defaults():
    public = AdaLeZOConfig(preset="public")
    assert (public.rho, public.gamma, public.tau, public.alpha, public.max_weight) == (0.1, 0.01, 0.1, 0.9, 10.0)
    script = AdaLeZOConfig(preset="public", rho=0.2, tau=0.2, max_weight=32.0)  # the public run script
    assert (script.rho, script.tau, script.max_weight, script.gamma) == (0.2, 0.2, 32.0, 0.01)
    assert bandit(preset="public").k == 1  # max(1, int(0.1 · 8)); ours would take ceil(0.8) = 1 too
    assert bandit(10, preset="public", rho=0.35).k == 3 and bandit(10, rho=0.35).k == 4  # int vs ceil of 3.5
    assert bandit(10, preset="public", rho=0.25).k == 1  # rho left at our default: the preset's 0.1 applies


def test_public_reward_is_abs_delta_in_an_ema_from_zero():
    b = bandit(preset="public")
    counts = torch.zeros(8, dtype=torch.int64)
    counts[2] = 1
    b.update(counts, b.reward(-2.0))
    assert b.rewards[2].item() == pytest.approx(0.1 * 2.0) and b.rewards[0].item() == 0.0
    b.update(counts, b.reward(3.0))
    assert b.rewards[2].item() == pytest.approx(0.9 * 0.2 + 0.1 * 3.0)
    assert bandit().reward(-2.0) == 4.0  # ours: Δ²


def test_public_weight_formula_and_its_expected_gain():
    """w = min(1/(k p), clip)·c, so E[w] = min(1, clip·k·p): low-probability arms are down-weighted ∝ p."""
    b = bandit(preset="public", rho=0.5)  # k = 4, τ = 0.1
    b.rewards = torch.linspace(0.0, 1.0, 8, dtype=torch.float64)
    b.num_drawn += 1
    probs = b.probs()
    counts = torch.tensor([0, 1, 2, 0, 0, 0, 1, 0])
    expected = [min(1 / (4 * p), 10.0) * c for p, c in zip(probs.tolist(), counts.tolist())]
    assert b.weights(counts, probs).tolist() == pytest.approx(expected, rel=1e-12)
    num = 20000
    mean = sum(b.weights(b.draw(probs, step), probs) for step in range(num)) / num
    gain = (10.0 * 4 * probs).clamp(max=1.0)
    assert float(gain.min()) < 0.5 and float(gain.max()) == 1.0  # the clip binds on some arms, not all
    se = (gain * 10.0 / num).sqrt()  # Poisson-like count noise of w ≤ clip·c, a generous bound
    assert ((mean - gain).abs() <= 4 * se + 1e-3).all(), (mean.tolist(), gain.tolist())
    twice = torch.tensor([2, 0, 0, 0, 0, 0, 0, 0])  # a rare arm drawn twice: public clips, then counts
    assert b.weights(twice, probs)[0].item() == 20.0 and bandit(rho=0.5).weights(twice, probs)[0].item() == 10.0


def test_public_preset_steps_on_a_quadratic():
    problem = Quadratic([2] * 6, [0.5**i for i in range(6)])
    opt = AdaLeZO(problem.shards, zo_config(lr=0.05, adalezo=AdaLeZOConfig(preset="public", rho=0.34)), seed=0)
    start = problem.loss()
    for step in range(1, 400):
        record = opt.step(problem.loss, step)
        assert record["num_layers_drawn"] <= 2  # k = int(0.34 · 6) = 2
    assert problem.loss() < 0.5 * start
