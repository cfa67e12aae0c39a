"""LOREN's estimator (zofsdp/optim/loren.py), not just that it runs: the closed-form preconditioner against
dense linear algebra, RLOO's expectation on a linear loss, shard-layout invariance through the one
all-reduce, and K forwards per step."""

from __future__ import annotations

import json
import threading

import torch

from zofsdp.config import LorenConfig, ZOConfig
from zofsdp.noise import Shard, block_id
from zofsdp.optim import build_optimizer
from zofsdp.optim.loren import coefficients

SHAPE = (3, 4)


def _cfg(**loren) -> ZOConfig:
    return ZOConfig(optimizer="loren", lr=1.0, eps=1e-3, noise="gaussian", noise_threads=1,
                    loren=LorenConfig(**{"num_queries": 3, "momentum": 0.0, "lr_cov": 0.0, **loren}))


def _shard(data: torch.Tensor, start: int = 0, full: int = 12) -> Shard:
    return Shard("w", data, start, full, block_id("w"), False, "head")


def test_preconditioner_matches_dense():
    """x = u − βp·a_flat is M·u with M symmetric and M² = (I + a_flat a_flatᵀ/λ)⁻¹ (OPTIMIZERS-NEXT 2.7.1)."""
    torch.manual_seed(0)
    a, u, lam = torch.randn(4, dtype=torch.float64), torch.randn(12, dtype=torch.float64), 0.1
    a_flat = a.repeat(3)
    _, _, beta = coefficients(a, 3, lam)
    x = u - beta * float(a_flat @ u) * a_flat
    m = torch.eye(12, dtype=torch.float64) - beta * torch.outer(a_flat, a_flat)
    target = torch.linalg.inv(torch.eye(12, dtype=torch.float64) + torch.outer(a_flat, a_flat) / lam)
    torch.testing.assert_close(m @ m, target, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x, m @ u)
    p = float(a @ u.view(3, 4).sum(0))  # the sharded form: a·colsum(u)
    assert abs(p - float(a_flat @ u)) < 1e-12


def test_rloo_is_unbiased_on_a_linear_loss():
    """E[ĝ] = M²g for f = gᵀθ, a fixed (lr_cov 0, no momentum, lr 1: Δθ = −ĝ): the mean of 3000 steps is
    within 5 standard errors of M²g, and M²g is far (> 10 s.e.) from the plain gradient g."""
    theta = torch.zeros(12)
    opt = build_optimizer(_cfg(), [_shard(theta)], seed=0, shapes={"w": SHAPE})
    a_flat = opt.a["w"].double().repeat(3)
    g = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64) + 2 * a_flat / a_flat.norm()
    target = torch.linalg.inv(torch.eye(12, dtype=torch.float64) + torch.outer(a_flat, a_flat) / 0.1) @ g
    estimates = []
    for step in range(1, 3001):
        before = theta.double().clone()
        opt.step(lambda: float(g @ theta.double()), step)
        estimates.append(before - theta.double())
    estimates = torch.stack(estimates)
    stderr = estimates.std(0) / len(estimates) ** 0.5
    assert ((estimates.mean(0) - target).abs() < 5 * stderr).all(), (estimates.mean(0), target)
    assert (target - g).abs().max() > 10 * stderr.max()


def _run_layout(pieces: list[tuple[int, int]], steps: int = 4) -> torch.Tensor:
    """LOREN on f = ½‖θ − 1‖², θ of shape (3, 4) cut into `pieces` (one "rank" each, threads), all-reduce stub."""
    theta = torch.linspace(-1, 1, 12)
    lock, barrier, box = threading.Lock(), threading.Barrier(len(pieces)), {}

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        with lock:
            box["sum"] = box.get("sum", 0) + t.clone()
        barrier.wait()
        out = box["sum"].clone()
        barrier.wait()
        box.pop("sum", None)
        barrier.wait()
        return out

    def loss() -> float:
        barrier.wait()  # every rank has perturbed its rows
        value = float(0.5 * (theta.double() - 1).square().sum())
        barrier.wait()
        return value

    cfg = _cfg(momentum=0.9, lr_cov=1.0)
    cfg.lr, cfg.eps = 1e-2, 0.3  # a large ε: at 1e-3 the a-update is below a's fp32 ulp (see the docs)
    opts = [build_optimizer(cfg, [_shard(theta[lo:hi], lo)], seed=1, shapes={"w": SHAPE},
                            all_reduce=all_reduce) for lo, hi in pieces]
    threads = [threading.Thread(target=lambda o=o: [o.step(loss, s) for s in range(1, steps + 1)]) for o in opts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return torch.cat([theta, *[o.a["w"] for o in opts]])


def test_update_does_not_depend_on_the_shard_layout():
    """One shard vs two uneven pieces that cut a row (DeepSpeed-like) through a summing all-reduce."""
    whole = _run_layout([(0, 12)])
    split = _run_layout([(0, 5), (5, 12)])
    torch.testing.assert_close(split[:12], whole[:12], rtol=0, atol=1e-6)
    torch.testing.assert_close(split[12:16], whole[12:16], rtol=0, atol=1e-6)
    assert torch.equal(split[12:16], split[16:20])  # a replicated: bit-identical on both "ranks"
    assert not torch.equal(whole[:12], torch.linspace(-1, 1, 12))
    initial = build_optimizer(_cfg(), [_shard(torch.zeros(12))], seed=1, shapes={"w": SHAPE}).a["w"]
    assert (whole[12:16] - initial).abs().max() > 1e-4  # a moved, so its replication is tested


def test_forwards_per_step():
    theta = torch.linspace(-1, 1, 12)
    opt = build_optimizer(_cfg(num_queries=5, lr_cov=1e-1), [_shard(theta)], seed=0, shapes={"w": SHAPE})
    for step in range(1, 4):
        calls = []
        record = opt.step(lambda calls=calls: calls.append(1) or float((theta - 1).square().sum()), step)
        assert len(calls) == record["forward_passes"] == 5
    assert not torch.equal(theta, torch.linspace(-1, 1, 12))


def test_a_gradient_is_the_score_function():
    """The code's ga = ε²√λ·w/(K−1)·∇_a log N(x; 0, ε²M²) at the evaluated x (OPTIMIZERS-NEXT 2.7.3),
    ∇ by autograd through a_flat = tile(a) (the row sum)."""
    torch.manual_seed(1)
    eps, lam, w, k_max = 1e-3, 0.1, 0.7, 3
    opt = build_optimizer(_cfg(num_queries=k_max, lr_cov=1.0, damping=lam), [_shard(torch.zeros(12))], seed=0,
                          shapes={"w": SHAPE})
    opt.cfg.eps = eps
    a, u = torch.randn(4, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    colsum = u.view(3, 4).sum(0)
    s, r, beta = coefficients(a, 3, lam)
    p = float(a @ colsum)
    x = eps * (u - beta * p * a.repeat(3))
    ga = a - opt.a_step(a, colsum, w, s, r, beta, p, 3)  # lr_a 1, no decay

    leaf = a.clone().requires_grad_(True)
    a_flat = leaf.repeat(3)
    precision = (torch.eye(12, dtype=torch.float64) + torch.outer(a_flat, a_flat) / lam) / eps**2
    log_density = -0.5 * x @ precision @ x + 0.5 * torch.logdet(precision)
    (grad,) = torch.autograd.grad(log_density, leaf)
    torch.testing.assert_close(ga, eps**2 * lam**0.5 * w / (k_max - 1) * grad, rtol=1e-9, atol=1e-15)


def test_state_round_trip():
    theta = torch.linspace(-1, 1, 12)
    cfg = _cfg(momentum=0.9, lr_cov=1e-1)
    opt = build_optimizer(cfg, [_shard(theta)], seed=0, shapes={"w": SHAPE})
    opt.step(lambda: float(theta.square().sum()), 1)
    again = build_optimizer(cfg, [_shard(theta.clone())], seed=0, shapes={"w": SHAPE})
    for (_, mine, *_), (_, theirs, *_) in zip(again.state_shards(), opt.state_shards()):
        mine.copy_(theirs)
    again.load_state_dict({**opt.state_dict(), "sharded_state_loaded": True})
    assert torch.equal(again.a["w"], opt.a["w"]) and torch.equal(again.momentum[0], opt.momentum[0])
    assert json.loads(json.dumps(opt.state_dict())) == opt.state_dict()  # checkpoint.py writes it as JSON
