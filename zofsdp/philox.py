"""Counter-based Gaussian noise: z is a pure function of (key, global flat index), element by element.

This module is the project's definition of `zo.noise=philox` and its oracle: plain torch integer ops,
any device, no Triton. `zofsdp.kernels` computes the same numbers in one fused GPU kernel per shard.

Definition (the project's own, so a Triton release cannot change it):
- Key. `mix_seed(run seed, step, direction, block id)` (63 bits) split into k0 = low 32 bits, k1 = high.
- Counter. Element i of a tensor's global flat index space uses counter n = i // 4, as the four words
  (n mod 2^32, n >> 32, 0, 0), and output word i % 4. One Philox call feeds four elements.
- Philox4x32-10 (Salmon et al. 2011, Random123): 10 rounds with multipliers 0xD2511F53 and 0xCD9E8D57
  and Weyl key increments 0x9E3779B9 and 0xBB67AE85; `tests/unit/test_philox.py` checks Random123's
  published known-answer vectors.
- Normals. Words (w0, w1) and (w2, w3) each give two normals by Box-Muller:
  u1 = ((w0 >> 8) + 1)·2^-24 in (0, 1], u2 = (w1 >> 8)·2^-24 in [0, 1) (exact in fp32: 24-bit integers),
  r = sqrt(-2 ln u1), z0 = r·cos(2π u2), z1 = r·sin(2π u2); likewise z2, z3 from (w2, w3). No clamp is needed
  (u1 > 0); |z| <= sqrt(48 ln 2) = 5.77. Integers are exact everywhere; the fp32 log/sqrt/cos/sin differ by
  ulps between libraries, so the kernel agrees with this reference to ~1e-6, not bitwise.
- Stochastic rounding of low-precision updates: issue 10's rule (noise.round_to), a 32-bit hash of
  (mix_seed(z's key, SR_TAG), global index), used through `round_stochastic`.

Speed on CPU is modest (tens of ns per element, see docs/performance.md); memory is bounded by the caller,
which asks for one chunk of indices at a time.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
SR_TAG = 0x5_7_0C  # separates the stochastic-rounding bits from z's stream for the same element
TWO_PI = 6.283185307179586
INV_2_24 = 2.0**-24


def split_key(seed: int) -> tuple[int, int]:
    """(k0, k1): the low and high 32 bits of a 64-bit key."""
    return seed & M32, (seed >> 32) & M32


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·x for a 32-bit constant and int64 x holding uint32 values.

    The product is < 2^64; int64 multiplication wraps modulo 2^64, so its low 64 bits are exact and the
    masks recover both halves (the KAT tests would catch a platform where this did not hold)."""
    p = x * a
    return (p >> 32) & M32, p & M32


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               k0: int, k1: int, rounds: int = ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32-`rounds` on int64 tensors of uint32 values; returns the four output words (int64)."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def words(key: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox words of each 64-bit counter (int64 tensor) under a 64-bit key."""
    k0, k1 = split_key(key)
    zero = torch.zeros_like(counters)
    return philox4x32(counters & M32, (counters >> 32) & M32, zero, zero, k0, k1)


def _box_muller(w_r: torch.Tensor, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 normals from two 32-bit words (see the module docstring for the exact rule)."""
    u1 = ((w_r >> 8) + 1).to(torch.float32) * INV_2_24
    u2 = (w_t >> 8).to(torch.float32) * INV_2_24
    r = torch.sqrt(torch.log(u1) * -2.0)
    theta = u2 * TWO_PI
    return r * torch.cos(theta), r * torch.sin(theta)


def _counter_range(lo: int, hi: int, device) -> tuple[int, torch.Tensor]:
    first = lo // 4
    return first, torch.arange(first, (hi + 3) // 4, dtype=torch.int64, device=device)


def normal(key: int, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """z[i] for global flat indices lo <= i < hi, fp32 (allocates ~60 bytes per element while it runs)."""
    if hi <= lo:
        return torch.empty(0, dtype=torch.float32, device=device)
    first, counters = _counter_range(lo, hi, device)
    w0, w1, w2, w3 = words(key, counters)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    z = torch.stack((z0, z1, z2, z3), dim=1).reshape(-1)  # element 4n + j is word j of counter n
    return z[lo - 4 * first : hi - 4 * first]


def round_bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest bfloat16 value (ties to even), kept in fp32, by integer ops on the bits.

    The same rule as torch's fp32 -> bf16 cast for finite values; the kernel uses this form because
    Triton's interpreter truncates float casts where CUDA rounds to nearest."""
    bits = x.view(torch.int32).to(torch.int64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF
    return fp32_from_bits(bits)


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, key: int, start: int) -> torch.Tensor:
    """fp32 x (global indices start, start+1, ...) stochastically rounded to bf16 or fp16, kept in fp32:
    noise.round_to's rule, the one definition that the chunked path, this oracle and (restated in Triton)
    the kernels share."""
    from zofsdp.noise import round_to

    return round_to(x, dtype, key, start).float()


def fp32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding a 32-bit pattern (possibly with carries past bit 31 for negatives) -> fp32."""
    bits = bits & M32
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def sr_key(key: int) -> int:
    """Key of a block's stochastic-rounding bits from z's key (noise.sr_key: mix_seed(key, SR_TAG))."""
    from zofsdp.noise import mix_seed

    return mix_seed(key, SR_TAG)


def reference_pass(data: torch.Tensor, global_start: int, key: int, *, perturb: float = 0.0,
                   restore: float = 0.0, update: float = 0.0, decay: float = 1.0,
                   stochastic: bool = False) -> None:
    """The oracle of the fused kernels, in place on one shard (1-D fp32 or bf16), whole shard at once.

    perturb != 0: x += d(perturb·z). Otherwise the update pass: x += d(restore·z); x *= decay;
    x += update·z, where d(·) rounds to 8 significant bits (noise._Lane.step) and a bf16 shard is
    rounded to nearest after each step; the update x·decay + update·z is one fp32 expression rounded once
    (stochastically when asked), as in noise.Noise.restore_update_."""
    n = data.numel()
    z = normal(key, global_start, global_start + n, data.device)
    x = data.float()

    def store(v: torch.Tensor) -> torch.Tensor:  # round to the shard's dtype, kept in fp32
        return v.to(data.dtype).float()

    if perturb:
        x = store(x + round_bf16_nearest(z * perturb))
    else:
        if restore:
            x = store(x + round_bf16_nearest(z * restore))
        x = x * decay + z * update  # fp32, one rounding to the shard's dtype below
        if stochastic and data.dtype in (torch.bfloat16, torch.float16):
            x = round_stochastic(x, data.dtype, sr_key(key), global_start)
        x = store(x)
    data.copy_(x)


def max_abs_normal() -> float:
    """The largest |z| this transform can produce (u1 = 2^-24)."""
    return math.sqrt(48 * math.log(2))
