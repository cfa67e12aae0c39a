"""MeZO's estimator and its in-place perturbation arithmetic."""

import math

import pytest
import torch

from zofsdp.config import ModelConfig, ZOConfig
from zofsdp.models import load_model, param_info
from zofsdp.noise import Noise, Shard, block_id
from zofsdp.optim.mezo import MeZO
from zofsdp.parallel.none import NoneBackend


def vector_shards(theta: torch.Tensor, pieces: int = 3) -> list[Shard]:
    """Several blocks over one flat vector (blocks of a tiny 'model')."""
    bounds = torch.linspace(0, theta.numel(), pieces + 1).long().tolist()
    return [Shard(f"b{i}", theta[a:b], 0, b - a, block_id(f"b{i}"), False, f"layers.{i}")
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def test_projected_gradient_is_unbiased_on_a_quadratic():
    """E[g z] = ∇f for f(θ) = ½ θᵀAθ − bᵀθ (exact for a quadratic: the central difference has no bias)."""
    torch.manual_seed(0)
    d = 12
    q = torch.randn(d, d, dtype=torch.float64)
    a, b = q @ q.T / d + torch.eye(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    theta = torch.randn(d)
    true_grad = a @ theta.double() - b
    opt = MeZO(vector_shards(theta), ZOConfig(lr=0.0, eps=1e-2, chunk_numel=1024), seed=0)

    def loss() -> float:
        t = theta.double()
        return float(0.5 * t @ a @ t - b @ t)

    num = 20_000
    estimate = torch.zeros(d, dtype=torch.float64)
    for step in range(num):
        g = opt.step(loss, step)["projected_grad"]
        z = torch.cat([opt.noise.slice(s, (step, 0)) for s in opt.shards]).double()
        estimate += g * z / num
    # Var of each coordinate of g z is ||∇f||² + ∇f_i²: the standard error of the mean is below
    # sqrt(2/num)·||∇f||; allow 4 of them on the norm of the error (d coordinates).
    tolerance = 4 * math.sqrt(2 * d / num) * true_grad.norm()
    assert (estimate - true_grad).norm() < tolerance, ((estimate - true_grad).norm(), tolerance)


def test_mezo_solves_least_squares():
    torch.manual_seed(1)
    n, d = 64, 16
    x, y = torch.randn(n, d), torch.randn(n)
    theta = torch.zeros(d)
    opt = MeZO(vector_shards(theta), ZOConfig(lr=0.02, eps=1e-3, chunk_numel=1024), seed=0)

    def loss() -> float:
        return float(((x @ theta - y) ** 2).mean() / 2)

    best = float(((x @ torch.linalg.lstsq(x, y).solution - y) ** 2).mean() / 2)
    start = loss()
    for step in range(1500):
        opt.step(loss, step)
    assert loss() - best < 0.1 * (start - best), (start, loss(), best)


def test_fp32_perturb_restore_is_exact_where_the_arithmetic_allows():
    """+εz, −2εz, +εz in place (MeZO with lr 0) on a real tiny model.

    Bit-exact for every weight where θ ± d are exact fp32 numbers (d = εz rounded to 8 significant bits,
    see noise._Lane.step): true unless the step crosses a power of two or d is below θ's ulp·2^-15. There the
    sum loses a last bit, which cannot be recovered without storing it (a parameter-sized buffer, which
    the design forbids): the error is at most one ulp of |θ| + |d|. A fused θ + α·z restored only ~55 % of weights.
    """
    model = load_model(ModelConfig(name_or_path="tiny-llama"), vocab_size=512)
    backend = NoneBackend()
    backend.wrap(model)
    shards = backend.shards()
    before = [s.data.clone() for s in shards]
    opt = MeZO(shards, ZOConfig(lr=0.0, eps=1e-3), seed=0)
    opt.step(lambda: 1.0, step=5)
    num_exact = num_allowed = num_total = 0
    for shard, theta in zip(shards, before):
        d = (opt.noise.slice(shard, (5, 0)) * 1e-3).to(torch.bfloat16).double()
        plus, minus = theta.double() + d, theta.double() - d
        exact_ops = (plus.float().double() == plus) & (minus.float().double() == minus)
        assert torch.equal(shard.data[exact_ops], theta[exact_ops]), shard.name
        # a lost bit is at most one ulp of the largest magnitude the weight passed through
        peak = (theta.abs() + d.abs().float()).abs()
        ulp = torch.nextafter(peak, torch.full_like(peak, math.inf)) - peak
        assert ((shard.data - theta).abs() <= ulp).all(), shard.name
        num_exact += int((shard.data == theta).sum())
        num_allowed += int(exact_ops.sum())
        num_total += theta.numel()
    assert num_allowed / num_total > 0.85, num_allowed / num_total
    assert num_exact / num_total > 0.9, num_exact / num_total


def test_fused_update_equals_unfused_arithmetic():
    """θ += (ε − ηg)z in one pass equals restore-then-update up to float rounding."""
    theta = torch.randn(3000)
    original = theta.clone()
    opt = MeZO(vector_shards(theta, 1), ZOConfig(lr=0.1, eps=1e-3, chunk_numel=1024), seed=0)
    losses = iter([2.0, 1.0])
    record = opt.step(lambda: next(losses), step=0)
    z = opt.noise.slice(opt.shards[0], (0, 0))
    assert record["projected_grad"] == pytest.approx(1 / 2e-3)
    assert torch.allclose(theta, original - 0.1 * record["projected_grad"] * z, atol=1e-5)


def test_non_finite_loss_restores_and_skips():
    theta = torch.randn(2000)
    original = theta.clone()
    opt = MeZO(vector_shards(theta, 1), ZOConfig(lr=0.1, eps=1e-3, chunk_numel=1024), seed=0)
    losses = iter([float("nan"), 1.0])
    record = opt.step(lambda: next(losses), step=0)
    assert record["skipped"] and math.isnan(record["projected_grad"])
    assert torch.allclose(theta, original, atol=1e-6)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-opt"])
def test_weight_decay_is_chosen_by_module_type(kind):
    model = load_model(ModelConfig(name_or_path=kind), vocab_size=512)
    info = param_info(model)
    modules = dict(model.named_modules())
    for name, (decay, group) in info.items():
        owner = modules[name.rsplit(".", 1)[0]]
        is_matrix = name.endswith(".weight") and isinstance(owner, (torch.nn.Linear, torch.nn.Embedding))
        assert decay == is_matrix, name
        assert group in ("embed", "head") or group.startswith("layers."), (name, group)
    assert any(name.endswith("bias") for name in info) == (kind == "tiny-opt")
    assert {g for _, g in info.values()} >= {"embed", "layers.0", "layers.1", "head"}


def test_weight_decay_is_applied_only_where_flagged():
    w, bias = torch.ones(2000), torch.ones(2000)
    shards = [Shard("w", w, 0, 2000, 1, True, "layers.0"), Shard("b", bias, 0, 2000, 2, False, "layers.0")]
    opt = MeZO(shards, ZOConfig(lr=0.1, eps=1e-3, weight_decay=0.5, chunk_numel=1024), seed=0)
    opt.step(lambda: 1.0, step=0)  # zero projected gradient: only decay moves the weights
    assert torch.allclose(w, torch.full_like(w, 0.95), atol=1e-5)
    assert torch.allclose(bias, torch.ones_like(bias), atol=1e-5)


def test_noise_buffers_are_bounded():
    from zofsdp.measure.tracker import tensor_bytes

    noise = Noise(seed=0, threads=2)
    assert tensor_bytes(vars(noise)) == 2 * (4 + 4 + 2) * noise.chunk_numel  # 640 KiB per lane, no more
