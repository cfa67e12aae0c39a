"""AdaLeZO: unbiased inverse-probability estimate, seeded draws, rewards, the clip, skipping."""

from __future__ import annotations

import math

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
