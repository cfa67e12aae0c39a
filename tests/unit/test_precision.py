"""Precision modes (docs/memory.md, "Precision modes"): stochastic rounding of bf16/fp16 updates, probes
that never touch low-precision shards, and what 1,000 probe cycles leave behind in each mode."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from zofsdp.config import ModelConfig, RunConfig, ZOConfig
from zofsdp.models import load_model
from zofsdp.noise import Noise, Shard, block_id, round_to
from zofsdp.optim.mezo import MeZO
from zofsdp.optim.probe import Probe
from zofsdp.parallel.none import NoneBackend

LOW = [torch.bfloat16, torch.float16]
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def weights(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """LLM-like weights: N(0, 0.02²)."""
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def vector_shards(theta: torch.Tensor, pieces: int = 1) -> list[Shard]:
    """One tensor `w` cut into `pieces` contiguous shards (a sharded layout of the same tensor)."""
    bounds = torch.linspace(0, theta.numel(), pieces + 1).long().tolist()
    return [Shard("w", theta[a:b], a, theta.numel(), block_id("w"), False, "layers.0")
            for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("magnitude", [1.0, 3e-6])  # 3e-6: fp16 subnormals (spacing 2^-24)
def test_stochastic_rounding_is_unbiased(dtype, magnitude):
    """x = 0.3 ulp above a grid point, 2^16 draws: the mean is x within 4 standard errors; RTN is not."""
    n = 1 << 16
    grid = torch.tensor(magnitude).to(dtype).float()
    ulp = (torch.nextafter(grid.to(dtype), torch.tensor(math.inf, dtype=dtype)).float() - grid).item()
    x = torch.full((n,), (grid + 0.3 * ulp).item())
    for sign in (1, -1):
        mean = round_to(sign * x, dtype, key=1234, start=0).float().mean().item()
        se = ulp * math.sqrt(0.3 * 0.7 / n)
        assert abs(mean - sign * x[0].item()) < 4 * se, (dtype, sign, (mean - sign * x[0].item()) / ulp)
    nearest = round_to(x, dtype, key=1234, start=0, rounding="nearest").float().mean().item()
    assert abs(nearest - x[0].item()) > 0.25 * ulp  # the test can tell a biased rounding


@pytest.mark.parametrize("dtype", LOW)
def test_rounding_bits_are_a_function_of_the_global_index(dtype):
    """The same element rounds the same way whatever the shard it sits in (any rank count)."""
    x = weights(10_000, torch.float32) + 1e-5 * torch.randn(10_000)
    whole = round_to(x, dtype, key=99, start=0)
    parts = torch.cat([round_to(x[a:b], dtype, key=99, start=a) for a, b in ((0, 3333), (3333, 7001), (7001, 10_000))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, round_to(x, dtype, key=100, start=0))  # and on the key


@pytest.mark.parametrize("dtype", LOW)
def test_update_is_kept_in_expectation_and_layout_free(dtype):
    """An update of 1e-6·z into N(0, 0.02²) weights (2^20 of them): applied/intended = <Δθ, z>/<u, z> is
    1 ± 0.02 with stochastic rounding; round-to-nearest keeps a small fraction in bf16 (docs/memory.md)."""
    n, lr_g = 1 << 20, 1e-6
    ratios = {}
    for rounding in ("stochastic", "nearest"):
        theta = weights(n, dtype)
        before = theta.float()
        noise = Noise(7, rounding=rounding)
        noise.restore_update_(vector_shards(theta, 3), (1, 0), 0.0, [lr_g] * 3, [1.0] * 3)
        z = noise.slice(vector_shards(torch.zeros(n))[0], (1, 0))
        ratios[rounding] = float((theta.float() - before) @ z / (lr_g * (z @ z)))
        if rounding == "stochastic":  # a 1-shard layout gives the very same bits
            one = weights(n, dtype)
            Noise(7).restore_update_(vector_shards(one, 1), (1, 0), 0.0, [lr_g], [1.0])
            assert torch.equal(one, theta)
    assert abs(ratios["stochastic"] - 1) < 0.02, ratios
    if dtype == torch.bfloat16:
        assert ratios["nearest"] < 0.1, ratios


def cycles(opt: MeZO, num: int) -> None:
    """`num` MeZO steps with lr 0 and a constant loss: +εz, −2εz, then the restore; no update."""
    for step in range(num):
        opt.step(lambda: 1.0, step)


def test_fp32_shards_after_1000_probe_cycles():
    """fp32 (and mixed, whose shards are fp32) restore in place: each cycle may lose a last bit where a
    step crosses a power of two (tests/unit/test_mezo.py). Measured bound after 1,000 cycles."""
    theta = weights(1 << 16, torch.float32)
    before = theta.clone()
    cycles(MeZO(vector_shards(theta), ZOConfig(lr=0.0, eps=1e-3), seed=0), 1000)
    drift = (theta - before).abs()
    ulp = torch.nextafter(before.abs(), torch.full_like(before, math.inf)) - before.abs()
    print(f"fp32, 1000 cycles: {(drift > 0).float().mean().item():.2%} moved, max {drift.max().item():.2e}, "
          f"max {(drift / ulp).max().item():.0f} ulp, rms {drift.pow(2).mean().sqrt().item():.2e}, "
          f"mean {(theta - before).mean().item():+.1e}")
    # Measured: 28 % of weights moved, max 1.5e-8, rms 6.7e-10 (one η·g·z update is 1e-6…1e-4): a bound
    # with headroom, that an unrestored probe (εz ≈ 1e-3) or a biased restore would break at once.
    assert drift.max() < 1e-7 and drift.pow(2).mean().sqrt() < 3e-9


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])  # float32: mixed precision's fp32 shards
def test_shards_behind_a_probe_are_exact_after_1000_probe_cycles(dtype):
    """With a probe (model.perturb=gathered, the default for mixed and bf16/fp16) the shards stay bit-identical
    through 1,000 cycles, while every forward saw the perturbation: the restore error is exactly 0."""
    theta = weights(1 << 16, dtype)
    before = theta.clone()
    probe = Probe()
    opt = MeZO(vector_shards(theta), ZOConfig(lr=0.0, eps=1e-3), seed=0, probe=probe)
    seen = []

    def loss() -> float:  # what a forward would see: the probe applied to a gathered copy
        copy = theta.clone()
        probe.apply("w", copy)
        seen.append(bool((copy != theta).any()))
        return 1.0

    for step in range(1000):
        opt.step(loss, step)
    assert torch.equal(theta, before) and len(seen) == 2000 and all(seen) and not probe.active


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_shards_in_place_are_refused(dtype):
    with pytest.raises(ValueError, match="cannot be perturbed in place"):
        MeZO(vector_shards(weights(16, dtype)), ZOConfig(), seed=0)


def test_in_place_bf16_probes_drift():
    """Why the probe exists: +εz, −2εz, +εz in place in bf16 moves many weights (the audit: 45.7 %)."""
    theta = weights(1 << 16, torch.bfloat16)
    before = theta.clone()
    noise = Noise(0)
    shards = vector_shards(theta)
    for scale in (1e-3, -2e-3, 1e-3):
        noise.add_(shards, (1, 0), scale)
    assert (theta != before).float().mean() > 0.3


def test_one_process_probe_forward_sees_theta_plus_eps_z_and_leaves_weights():
    """bf16 weights, `none` backend: during a probe the forward equals a bf16 model with θ + d(εz)
    applied in place; afterwards the weights are bit-identical (the swap is undone)."""
    cfg = ModelConfig(name_or_path="tiny-llama", dtype="bfloat16")
    backend = NoneBackend(RunConfig(model=cfg))
    model = backend.wrap(load_model(cfg, vocab_size=512))
    reference = load_model(cfg, vocab_size=512)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = MeZO(backend.shards(), ZOConfig(lr=0.0, eps=1e-2), seed=3, probe=backend.probe)
    ids = torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        opt.perturb(opt.shards, (1, 0), 1e-2, [n for n, _, _ in opt.blocks])
        probed = model(input_ids=ids).logits
        opt.perturb(opt.shards, (1, 0), -1e-2, [n for n, _, _ in opt.blocks])
        for name, p in reference.named_parameters():
            opt.noise.add_([Shard(name, p.data.view(-1), 0, p.numel(), block_id(name), False, "")], (1, 0), 1e-2)
        expected = reference(input_ids=ids).logits
    assert torch.equal(probed, expected)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dtype": "bfloat16", "compute_dtype": "float32"}, "only float32 shards"),
    ({"dtype": "float16", "compute_dtype": "bfloat16"}, "only float32 shards"),
])
def test_precision_modes_that_do_not_exist_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(model=ModelConfig(**overrides))


@pytest.mark.parametrize(("dtype", "compute", "perturb", "optimizer", "gathered"), [
    ("float32", "", "auto", "mezo", False),           # fp32: in place, as always
    ("float32", "bfloat16", "auto", "mezo", True),    # mixed: gathered, exact restore
    ("float32", "bfloat16", "auto", "hizoo", False),  # its probe is z/√H with H sharded: in place
    ("float32", "bfloat16", "shards", "mezo", False),
    ("float32", "", "gathered", "mezo", True),
    ("bfloat16", "", "auto", "mezo", True),
    ("float16", "", "auto", "loren", True),           # (loren itself then refuses the probe)
])
def test_where_probes_go(dtype, compute, perturb, optimizer, gathered):
    from zofsdp.config import perturbs_gathered

    model = ModelConfig(dtype=dtype, compute_dtype=compute, perturb=perturb)
    assert perturbs_gathered(model, optimizer) is gathered


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": ModelConfig(dtype="bfloat16", perturb="shards")}, "does not restore bf16/fp16 shards"),
    ({"model": ModelConfig(compute_dtype="bfloat16", perturb="gathered"), "zo": ZOConfig(optimizer="hizoo")},
     "needs model.perturb=shards"),
])
def test_impossible_perturb_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**overrides)


def test_deepspeed_takes_every_precision_mode():
    from zofsdp.config import ParallelConfig

    for model in (ModelConfig(dtype="bfloat16"), ModelConfig(dtype="float16"), ModelConfig(compute_dtype="bfloat16")):
        RunConfig(model=model, parallel=ParallelConfig(backend="deepspeed"))
