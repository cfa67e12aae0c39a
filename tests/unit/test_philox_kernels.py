"""The fused Triton passes of `zo.noise=philox`, run on CPU tensors by Triton's interpreter.

Skipped where Triton cannot be imported (it is in the `dev` extra). The interpreter costs ~20-200 µs per
element, so the shards here are small."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Kernels run on CPU tensors through Triton's interpreter, which must be on before Triton is imported (and
# stays on: Triton reads it again at run time). Never switched on for a GPU machine's whole test session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels on CPU tensors (TRITON_INTERPRET=1); on a GPU use "
                "launch/gpu_check.sh", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from tests.unit.test_philox import KAT, assert_restored
from zofsdp import kernels, philox
from zofsdp._triton_noise import _words
from zofsdp.kernels import PhiloxKernels
from zofsdp.noise import Noise, Shard, mix_seed

SEED = 11


@triton.jit
def _words_kernel(out, counters, key_lo, key_hi, N: tl.constexpr):
    i = tl.arange(0, N)
    w0, w1, w2, w3 = _words(tl.load(counters + i), key_lo, key_hi)
    tl.store(out + 4 * i, w0.to(tl.int32, bitcast=True))
    tl.store(out + 4 * i + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out + 4 * i + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out + 4 * i + 3, w3.to(tl.int32, bitcast=True))


def test_kernel_philox_integers_are_exact():
    """The kernel's words for counters (n, n >> 32, 0, 0): the reference's, and Random123's first KAT."""
    counters = torch.tensor([0, 1, 2, 3, 4, 5, 1 << 33, (1 << 40) + 7], dtype=torch.int64)
    key = mix_seed(1, 2, 3, 4)
    out = torch.empty(4 * counters.numel(), dtype=torch.int32)
    _words_kernel[(1,)](out, counters, *philox.split_key(key), N=counters.numel())
    ref = torch.stack(philox.words(key, counters), dim=1).reshape(-1)
    assert torch.equal(out.long() & philox.M32, ref)
    zero = torch.zeros(1, dtype=torch.int64)
    out = torch.empty(4, dtype=torch.int32)
    _words_kernel[(1,)](out, zero, 0, 0, N=1)
    assert tuple(int(w) & philox.M32 for w in out) == KAT[0][2]


def z_of(n: int, start: int, block: int, key=(1, 0), group_min: int = kernels.GROUP_MIN) -> torch.Tensor:
    """z through the kernels: 0 + 1·z of one shard."""
    shard = Shard("w", torch.zeros(n), start, start + n + 9, 123, True, "layers.0")
    PhiloxKernels(SEED, block=block, group_min=group_min).restore_update_([shard], key, 0.0, [1.0], [1.0])
    return shard.data


def test_kernel_z_is_the_reference_within_1e_6():
    n = 5000
    z = z_of(n, 0, 64)
    ref = philox.normal(mix_seed(SEED, 1, 0, 123), 0, n)
    assert float((z - ref).abs().max()) <= 1e-6


def test_kernel_z_does_not_depend_on_block_size_or_shard_split():
    n, cut = 3001, 1234
    whole = z_of(n, 0, 128)
    assert torch.equal(z_of(n, 0, 16), whole)
    assert torch.equal(torch.cat([z_of(cut, 0, 32), z_of(n - cut, cut, 64)]), whole)  # unaligned split
    assert torch.equal(z_of(n, 0, 32, group_min=1 << 30), whole)  # the grouped kernel


def _shards(dtype: torch.dtype) -> list[Shard]:
    g = torch.Generator().manual_seed(0)
    sizes = [(900, 5), (40, 0), (3, 2), (130, 61)]  # unaligned starts; two single launches, two grouped
    return [Shard(f"w{i}", (torch.randn(n, generator=g) * 0.02).to(dtype), start, start + n + 3, 200 + i,
                  i % 2 == 0, "layers.0") for i, (n, start) in enumerate(sizes)]


@pytest.mark.parametrize("dtype, stochastic", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.bfloat16, True), (torch.float16, True)])
def test_fused_passes_match_the_reference(dtype, stochastic):
    """Perturb, then restore + weighted update + decay, on big (own launch) and small (grouped) shards."""
    shards = _shards(dtype)
    expected = [s.data.clone() for s in shards]
    k = PhiloxKernels(SEED, block=32, group_min=100)
    updates, decays = [1e-3 * (i + 1) for i in range(4)], [0.99, 1.0, 0.98, 1.0]
    k.add_(shards, (4, 1), 1e-3)
    k.restore_update_(shards, (4, 1), -1e-3 if dtype == torch.float32 else 0.0, updates, decays, stochastic)
    assert k.num_launches == 2 * 3  # per pass: two single launches, one grouped
    for i, (s, x) in enumerate(zip(shards, expected)):
        key = mix_seed(SEED, 4, 1, s.block_id)
        philox.reference_pass(x, s.global_start, key, perturb=1e-3)
        philox.reference_pass(x, s.global_start, key, restore=-1e-3 if dtype == torch.float32 else 0.0,
                              update=updates[i], decay=decays[i], stochastic=stochastic)
        if dtype == torch.float32:  # z may differ by an ulp (numpy vs torch log/cos): so may the update
            ulp = torch.nextafter(x.abs(), torch.full_like(x, math.inf)) - x.abs()
            assert ((s.data - x).abs() <= ulp + abs(updates[i]) * 1e-6).all(), s.name  # z within 1e-6
        else:
            assert float((s.data != x).float().mean()) < 0.01, s.name  # rare rounding-boundary flips


def test_kernels_restore_fp32_like_the_chunked_path():
    base = torch.randn(6000) * 0.02
    shard = Shard("w", base.clone(), 0, 6000, 3, True, "layers.0")
    k = PhiloxKernels(1, block=64)
    for scale in (1e-3, -2e-3, 1e-3):
        k.add_([shard], (1, 0), scale)
    assert_restored(shard.data, base, 1e-3 * philox.normal(mix_seed(1, 1, 0, 3), 0, 6000))
    chunked = Shard("w", base.clone(), 0, 6000, 3, True, "layers.0")
    Noise(1, kind="philox", chunk_numel=1024).restore_update_([chunked], (1, 0), 0.0, [1e-2], [0.9])
    k.restore_update_([shard], (1, 0), 0.0, [1e-2], [0.9])
    assert float((shard.data - chunked.data).abs().max()) <= 1e-8


def test_noise_uses_the_kernels_when_asked(monkeypatch):
    monkeypatch.setenv("ZOFSDP_PHILOX_KERNELS", "1")
    noise = Noise(SEED, kind="philox")
    assert isinstance(noise.kernels, PhiloxKernels)
    shard = Shard("w", torch.zeros(700), 50, 800, 123, True, "layers.0")
    assert float((noise.slice(shard, (1, 0)) - philox.normal(mix_seed(SEED, 1, 0, 123), 50, 750)).abs().max()) \
        <= 1e-6
    assert noise.kernels.num_launches == 1 and noise.num_chunks_generated == 0


def test_bf16_update_matches_the_chunked_path_with_stochastic_rounding():
    """Kernel vs Noise's chunked path (issue 10's noise.round_to) on a bf16 shard: the same rounding bits,
    so only the rare element whose fp32 value moved across a rounding point by z's last-ulp differs."""
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(5000, generator=g) * 0.02).bfloat16()
    chunked = Shard("w", base.clone(), 333, 9000, 5, True, "layers.0")
    fused = Shard("w", base.clone(), 333, 9000, 5, True, "layers.0")
    Noise(2, kind="philox", chunk_numel=1024).restore_update_([chunked], (6, 0), 0.0, [1e-4], [0.999])
    PhiloxKernels(2, block=64).restore_update_([fused], (6, 0), 0.0, [1e-4], [0.999], stochastic=True)
    assert not torch.equal(fused.data, base)
    assert float((fused.data != chunked.data).float().mean()) < 0.005


def test_kernels_compile_for_an_h100_without_a_gpu():
    """Every variant through Triton's real compiler (sm_90, ptxas from the wheel): the interpreter does not
    type-check like the compiler does."""
    script = Path(__file__).parent / "philox_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "90"], check=False, cwd=Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 16


@pytest.mark.parametrize("optimizer", ["mezo", "curvzo", "adalezo"])
def test_optimizers_through_the_kernels_follow_the_chunked_path(monkeypatch, optimizer):
    """Masked (only the drawn blocks) and weighted (per-block ĝ·w) passes: 4 steps through the fused kernels
    equal 4 steps through Noise's chunked philox path, to z's 1e-6."""
    from tests.unit.sparse_problems import Quadratic, zo_config
    from zofsdp.optim import build_optimizer

    sizes, curvature = [300, 50, 700, 20, 130, 64], [1.0, 4.0, 0.5, 2.0, 1.0, 3.0]
    results = []
    for fused in (False, True):
        monkeypatch.setenv("ZOFSDP_PHILOX_KERNELS", "1" if fused else "0")
        problem = Quadratic(sizes, curvature, dtype=torch.float32)
        opt = build_optimizer(zo_config(optimizer=optimizer, noise="philox", lr=1e-2), problem.shards, seed=3)
        assert (opt.noise.kernels is not None) == fused
        def loss(problem=problem) -> float:  # in float64: an fp32 sum's rounding would swamp Δ
            return float(0.5 * (problem.h.double() * problem.theta.double() ** 2).sum())

        for step in range(1, 5):
            opt.step(loss, step)
        results.append(problem.flat())
    assert not torch.equal(results[1], torch.ones_like(results[1]))
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-6)


def test_masked_passes_keep_the_plan_cache_bounded():
    """CurvZO and AdaLeZO pass a new subset of shards every step; their launch plans (small device tables)
    must not pile up (an H100 run showed +2,560 B per masked step before the bound was lowered)."""
    k = PhiloxKernels(seed=3)
    shards = [Shard(f"w{i}", torch.zeros(64), 0, 64, i, True, "") for i in range(6)]
    for step in range(3 * kernels.PLAN_CACHE):
        subset = [s for i, s in enumerate(shards) if (step >> (i % 4)) & 1 or i == 5]
        k.add_(subset, (step, 0), 1e-3)
        assert len(k._plans) <= kernels.PLAN_CACHE
    k.add_(shards, (0, 0), 1e-3)
    plans = dict(k._plans)
    k.add_(shards, (0, 0), -1e-3)  # the same list again (a step's restore): the cached plan, not a new one
    assert k._plans.keys() == plans.keys() and all(k._plans[key] is plans[key] for key in plans)
