"""Triton code of the `philox` noise passes (imported only by `zofsdp.kernels`, never at package import).

Each program takes BLOCK Philox counters, i.e. 4·BLOCK consecutive global indices, computes their four
normals once, interleaves them into one vector in element order (z0..z3 of counter 0, then of counter 1,
...) and applies the pass with one contiguous masked load and store over the 4·BLOCK elements. (Applying
z0..z3 as four stride-4 passes left every access uncoalesced: a fused perturb pass ran at 0.47 of copy_
bandwidth on an H100.) The numbers are those of `zofsdp.philox` (its docstring is the definition). Only
Triton 3.x basics are used: `tl.umulhi`, bit casts, masks, `tl.static_range`, `tl.join`/`tl.reshape`,
int-to-pointer casts for the grouped kernel.

Rounding is done with integer ops on the fp32 bits, never with a float cast, because Triton's interpreter
truncates fp32 -> bf16 casts where CUDA rounds to nearest: both then give the same bits.
"""

import triton
import triton.language as tl

# Pass kinds (constexpr MODE)
PERTURB = 0
UPDATE = 1
# Storage kinds (constexpr STORE)
FP32 = 0
BF16 = 1
FP16 = 2


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (Random123's round and key schedule)."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _words(counter, key_lo, key_hi):
    lo = counter.to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    k0 = key_lo.to(tl.uint32)
    k1 = key_hi.to(tl.uint32)
    return _philox(lo, hi, zero, zero, k0, k1)


@triton.jit
def _box_muller(w_r, w_t):
    u1 = ((w_r >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, exact
    u2 = (w_t >> 8).to(tl.float32) * 5.9604644775390625e-08
    r = tl.sqrt_rn(tl.log(u1) * -2.0)  # correctly rounded, as torch.sqrt (tl.sqrt is sqrt.approx on CUDA)
    theta = u2 * 6.283185307179586
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _rne_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _hash32(x):
    """noise._hash32 on uint32 (multiplication wraps modulo 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _round_stochastic(x, gidx, sr_lo, sr_hi, STORE: tl.constexpr):
    """philox.round_stochastic (issue 10's rule): hash bits below the target mantissa, then truncate."""
    word = _hash32(_hash32(gidx.to(tl.uint32) ^ sr_lo.to(tl.uint32)) ^ sr_hi.to(tl.uint32))
    b = x.to(tl.uint32, bitcast=True)
    if STORE == 1:
        out = ((b + (word >> 16)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        normal = ((b + (word >> 19)) & 0xFFFFE000).to(tl.float32, bitcast=True)
        sub = tl.floor(x * 16777216.0 + (word >> 16).to(tl.float32) * 1.52587890625e-05) * 5.9604644775390625e-08
        out = tl.where(tl.abs(x) < 6.103515625e-05, sub, normal)
    return out


@triton.jit
def _rne_fp16(x):
    """fp32 -> nearest fp16 value (ties to even), kept in fp32: 13 bits dropped where fp16 is normal,
    x·2^24 rounded to an integer below 2^-14 (fp16 subnormals). Overflow past 65504 is not handled.
    (The interpreter's own "rtne" cast rounds half up and loses mantissa carries, hence this.)"""
    b = x.to(tl.uint32, bitcast=True)
    normal = ((b + 0xFFF + ((b >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    y = x * 16777216.0  # exact
    r = tl.floor(y + 0.5)
    r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)  # ties to even
    return tl.where(tl.abs(x) < 6.103515625e-05, r * 5.9604644775390625e-08, normal)


@triton.jit
def _store_round(x, STORE: tl.constexpr):
    """Round to the shard's grid by integer ops, so the store's own cast is exact."""
    if STORE == 1:
        x = _rne_bf16(x)
    elif STORE == 2:
        x = _rne_fp16(x)
    return x


@triton.jit
def _apply(x_ptr, idx, start, n, z, sr_lo, sr_hi, perturb, restore, update, decay,
           MODE: tl.constexpr, STORE: tl.constexpr, SR: tl.constexpr,
           HAS_RESTORE: tl.constexpr, HAS_DECAY: tl.constexpr):
    """One pass on the elements at local indices `idx` (masked to [0, n)); the steps of
    `philox.reference_pass`."""
    mask = (idx >= 0) & (idx < n)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        x = _store_round(x + _rne_bf16(z * perturb), STORE)
    else:
        if HAS_RESTORE:
            x = _store_round(x + _rne_bf16(z * restore), STORE)
        if HAS_DECAY:
            x = x * decay
        x = x + z * update
        if SR:
            x = _round_stochastic(x, idx + start, sr_lo, sr_hi, STORE)
        x = _store_round(x, STORE)
    if STORE == 2:
        tl.store(x_ptr + idx, x.to(tl.float16), mask=mask)  # exact: x is already on the fp16 grid
    elif STORE == 1:
        tl.store(x_ptr + idx, x.to(tl.bfloat16), mask=mask)  # exact: x is already on the bf16 grid
    else:
        tl.store(x_ptr + idx, x, mask=mask)


@triton.jit
def _tile(x_ptr, n, start, first_counter, key_lo, key_hi, sr_lo, sr_hi, perturb, restore, update, decay,
          BLOCK: tl.constexpr, MODE: tl.constexpr, STORE: tl.constexpr, SR: tl.constexpr,
          HAS_RESTORE: tl.constexpr, HAS_DECAY: tl.constexpr):
    """BLOCK counters from `first_counter` (a shard's tile): generate, then apply to 4·BLOCK elements."""
    counter = first_counter + tl.arange(0, BLOCK).to(tl.int64)
    w0, w1, w2, w3 = _words(counter, key_lo, key_hi)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    # [BLOCK, 2, 2] with z[c, j, k] = z_(2j+k) of counter c: row-major, that is element order
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * BLOCK])
    idx = first_counter * 4 - start + tl.arange(0, 4 * BLOCK).to(tl.int64)  # local; < 0 before the shard
    _apply(x_ptr, idx, start, n, z, sr_lo, sr_hi, perturb, restore, update, decay,
           MODE, STORE, SR, HAS_RESTORE, HAS_DECAY)


# n and start are specialized (divisible by 16, == 1, other): where both divide by 16 the compiler sees that
# each counter's four elements are aligned and in the mask together, and vectorizes the load and store
# (H100, 268M fp32: 0.96 of copy_ bandwidth, against 0.83 with scalar accesses).
@triton.jit(do_not_specialize=["key_lo", "key_hi", "sr_lo", "sr_hi"])
def shard_kernel(x_ptr, n, start, key_lo, key_hi, sr_lo, sr_hi, perturb, restore, update, decay,
                 BLOCK: tl.constexpr, MODE: tl.constexpr, STORE: tl.constexpr, SR: tl.constexpr,
                 HAS_RESTORE: tl.constexpr, HAS_DECAY: tl.constexpr):
    """One shard, one launch: program p takes counters start//4 + p·BLOCK ... (+BLOCK)."""
    start = tl.cast(start, tl.int64)  # 64-bit global indices (tl.cast: a start of 1 comes as a constexpr)
    first = start // 4 + tl.program_id(0).to(tl.int64) * BLOCK
    _tile(x_ptr, n, start, first, key_lo, key_hi, sr_lo, sr_hi, perturb, restore, update, decay,
          BLOCK, MODE, STORE, SR, HAS_RESTORE, HAS_DECAY)


@triton.jit
def group_kernel(tile_shard, tile_counter, addrs, numels, starts, keys, scalars,
                 BLOCK: tl.constexpr, MODE: tl.constexpr, STORE: tl.constexpr, SR: tl.constexpr,
                 HAS_RESTORE: tl.constexpr, HAS_DECAY: tl.constexpr):
    """Many small shards of one dtype, one launch: program p takes tile p of the tile table.

    Tables (device tensors): tile_shard/tile_counter int64 [tiles]; addrs/numels/starts int64 [shards];
    keys int64 [shards, 4] = (key lo, key hi, sr lo, sr hi); scalars fp32 [shards, 4] =
    (perturb, restore, update, decay). Per-shard scalars make masked and weighted passes one launch."""
    p = tl.program_id(0)
    s = tl.load(tile_shard + p)
    first = tl.load(tile_counter + p)
    if STORE == 1:
        x_ptr = tl.load(addrs + s).to(tl.pointer_type(tl.bfloat16))
    elif STORE == 2:
        x_ptr = tl.load(addrs + s).to(tl.pointer_type(tl.float16))
    else:
        x_ptr = tl.load(addrs + s).to(tl.pointer_type(tl.float32))
    _tile(x_ptr, tl.load(numels + s), tl.load(starts + s), first,
          tl.load(keys + 4 * s), tl.load(keys + 4 * s + 1), tl.load(keys + 4 * s + 2),
          tl.load(keys + 4 * s + 3), tl.load(scalars + 4 * s), tl.load(scalars + 4 * s + 1), tl.load(scalars + 4 * s + 2),
          tl.load(scalars + 4 * s + 3), BLOCK, MODE, STORE, SR, HAS_RESTORE, HAS_DECAY)
