"""`zo.noise=philox`: the torch reference (integers, normals, statistics) and the Noise chunked path on CPU.

The Triton kernels are checked against this reference in test_philox_kernels.py (interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

from zofsdp import philox
from zofsdp.config import ZOConfig
from zofsdp.noise import Noise, Shard, mix_seed, resolve_kind

# Random123 1.14, examples/kat_vectors: philox4x32 10 (counter words, key words -> output words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KEY = mix_seed(0, 3, 1, 12345)


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_z_is_a_pure_function_of_the_global_index():
    """Any range, any split: the same z, bit for bit (the chunk is no part of the definition)."""
    full = philox.normal(KEY, 0, 10_007)
    for lo, hi in [(0, 1), (1, 2), (3, 3000), (3000, 10_007), (4097, 9001)]:
        assert torch.equal(philox.normal(KEY, lo, hi), full[lo:hi])
    big = philox.normal(KEY, (1 << 34) + 5, (1 << 34) + 1005)  # 64-bit counters use the high word
    assert not torch.equal(big, full[5:1005])


def test_the_transform_is_bounded_and_never_nan():
    z = philox.normal(KEY, 0, 1 << 18)
    assert bool(torch.isfinite(z).all())
    assert float(z.abs().max()) <= philox.max_abs_normal()


def _ks_normal(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample to N(0, 1)."""
    x = z.double().sort().values
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    lower = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def test_moments_and_ks_against_the_standard_normal():
    n = 1 << 20
    z = philox.normal(KEY, 0, n).double()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)  # kurtosis: the tails are right too
    assert _ks_normal(z) < 1.95 / math.sqrt(n)  # KS critical value at p = 0.001


@pytest.mark.parametrize("other", [mix_seed(0, 4, 1, 12345), mix_seed(0, 3, 0, 12345), mix_seed(0, 3, 1, 12346),
                                   mix_seed(1, 3, 1, 12345)])
def test_independent_across_steps_directions_blocks_and_seeds(other):
    n = 1 << 18
    a, b = philox.normal(KEY, 0, n).double(), philox.normal(other, 0, n).double()
    bound = 5 / math.sqrt(n)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([a * a, b * b]))[0, 1])) < bound  # not just uncorrelated


def test_neighbours_are_independent():
    """Elements of one counter share a Philox call (and pairs a Box-Muller radius): still independent."""
    n = 1 << 18
    z = philox.normal(KEY, 0, n).double().view(-1, 4)
    bound = 5 / math.sqrt(n // 4)
    for i, j in [(0, 1), (0, 2), (1, 3), (2, 3)]:
        for f in (lambda t: t, lambda t: t * t):
            assert abs(float(torch.corrcoef(torch.stack([f(z[:, i]), f(z[:, j])]))[0, 1])) < bound, (i, j)
    flat = z.view(-1)
    assert abs(float(torch.corrcoef(torch.stack([flat[:-4], flat[4:]]))[0, 1])) < 5 / math.sqrt(n)


def test_bf16_rounding_by_bits_is_torchs_cast():
    x = torch.randn(1 << 16) * torch.logspace(-8, 3, 1 << 16)
    assert torch.equal(philox.round_bf16_nearest(x), x.bfloat16().float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_on_the_grid(dtype):
    x = torch.full((1 << 16,), 1.0 + 2.0**-10)  # 1/8 of a bf16 ulp above 1; fp16: exactly representable
    r = philox.round_stochastic(x, dtype, KEY, 0)
    assert torch.equal(r.to(dtype).float(), r)
    assert abs(float(r.double().mean()) - float(x[0])) < 5 * 2.0**-7 / math.sqrt(r.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_issue_10s_rule(dtype):
    """Kernels and the chunked path round the same bits the same way (noise.round_to, when present)."""
    from zofsdp import noise

    if not hasattr(noise, "round_to"):
        pytest.skip("noise.round_to (issue 10) is not in this tree")
    x = torch.randn(10_000) * torch.logspace(-6, 0, 10_000)
    key = mix_seed(7, 2, 0, 99)
    ours = philox.round_stochastic(x, dtype, philox.sr_key(key), 123)
    theirs = noise.round_to(x, dtype, noise.sr_key(7, (2, 0, 99)), 123, "stochastic")
    assert torch.equal(ours.to(dtype), theirs)


# ------------------------------------------------------------------------ Noise(kind="philox") on CPU


def _shard(n: int, start: int, full: int, block: int = 77) -> Shard:
    return Shard("w", torch.zeros(n), start, full, block, True, "layers.0")


@pytest.mark.parametrize("chunk", [1024, 4096])
def test_noise_slice_is_the_reference_for_any_chunk_and_shard(chunk):
    noise = Noise(5, kind="philox", chunk_numel=chunk)
    key = mix_seed(5, 2, 0, 77)
    for start, n in [(0, 10_000), (1000, 3333), (5001, 4999)]:
        assert torch.equal(noise.slice(_shard(n, start, 10_000), (2, 0)), philox.normal(key, start, start + n))


def assert_restored(after: torch.Tensor, before: torch.Tensor, d: torch.Tensor) -> None:
    """+d, -2d, +d in fp32 returns the bits where θ ± d are exact (test_mezo explains); elsewhere within
    one ulp of |θ| + |d|. Most weights are exact."""
    d = philox.round_bf16_nearest(d).double()
    plus, minus = before.double() + d, before.double() - d
    exact = (plus.float().double() == plus) & (minus.float().double() == minus)
    assert torch.equal(after[exact], before[exact])
    peak = before.abs() + d.abs().float()
    assert ((after - before).abs() <= torch.nextafter(peak, torch.full_like(peak, math.inf)) - peak).all()
    assert float((after == before).float().mean()) > 0.85


def test_noise_philox_restores_fp32_exactly_and_threads_do_not_matter():
    base = torch.randn(9000) * 0.02
    results = []
    for threads in (1, 2):
        shard = Shard("w", base.clone(), 0, 9000, 3, True, "layers.0")
        noise = Noise(1, kind="philox", chunk_numel=1024, threads=threads)
        for scale in (1e-3, -2e-3, 1e-3):
            noise.add_([shard], (1, 0), scale)
        assert_restored(shard.data, base, 1e-3 * philox.normal(mix_seed(1, 1, 0, 3), 0, 9000))
        noise.restore_update_([shard], (1, 0), 0.0, [1e-2], [1.0])
        results.append(shard.data)
    assert torch.equal(results[0], results[1])


def test_auto_is_philox_on_cuda_and_gaussian_elsewhere():
    assert ZOConfig().noise == "auto"
    assert resolve_kind("auto", "cpu") == "gaussian"
    assert resolve_kind("auto", torch.device("cuda", 0)) == "philox"
    assert resolve_kind("table", torch.device("cuda", 0)) == "table"
    assert Noise(0, kind="auto").kind == "gaussian"
    with pytest.raises(ValueError, match="philox"):
        Noise(0, kind="nope")


def test_the_plan_is_made_once_per_shard_layout():
    noise = Noise(0, kind="gaussian", chunk_numel=1024)
    calls = []
    plan = noise.plan
    noise.plan = lambda shards: calls.append(1) or plan(shards)
    shard = _shard(5000, 0, 5000)
    for _ in range(3):
        noise.add_([shard], (1, 0), 1e-3)
    assert len(calls) == 1
    noise.add_([_shard(3000, 0, 5000)], (1, 0), 1e-3)
    assert len(calls) == 2


def test_table_offsets_come_from_the_host_and_are_unchanged_on_cpu():
    """The table's offsets are drawn on a host generator (`_Lane.host`; on CUDA a device draw read back with
    int() would sync once per chunk); on CPU they are the same numbers as before that change."""
    noise = Noise(4, kind="table", chunk_numel=1024, table_numel=1 << 14)
    z = noise.slice(_shard(2048, 0, 2048, block=9), (3, 1))
    for chunk in (0, 1):  # the pre-change rule: the lane's own CPU generator, seeded per chunk
        g = torch.Generator().manual_seed(mix_seed(4, 3, 1, 9, chunk))
        offset = int(torch.randint(0, (1 << 14) - 1024 + 1, (1,), generator=g))
        assert torch.equal(z[chunk * 1024 : (chunk + 1) * 1024], noise.table[offset : offset + 1024])
    assert all(lane.host.device.type == "cpu" for lane in noise.lanes)
