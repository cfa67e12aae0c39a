"""Perturbation noise z as a pure function of (run seed, step, direction, block id, global flat index).

The global index space of each tensor is cut into fixed chunks of `chunk_numel` elements. Chunk c of
block b at (step, direction) is drawn from its own generator seeded by a hash of all five numbers, so any
rank can produce exactly the slice of z that covers its own shard, whatever the world size, backend or
shard layout. A shard that starts or ends inside a chunk generates that whole chunk and uses its part:
torch's generators give no random access inside a stream, so the chunk is the unit of reproducibility.

Two kinds of z, both with E[z] = 0 and E[z z^T] = I:
- `gaussian`: fresh `torch.randn` per chunk (MeZO's choice).
- `table`: a fixed table of Gaussians made once from the run seed; chunk c reads a contiguous slice at a
  seeded offset (Salimans et al. 2017 share a table among evolution-strategy workers). No RNG in the hot
  loop, ~8x cheaper on CPU, at the price of the table's memory and of slices that can overlap.
- `philox`: counter-based, z a pure function of (key, global flat index) element by element
  (`zofsdp.philox`); chunks are only a unit of work. On CUDA one fused Triton launch per shard and pass
  (`zofsdp.kernels`); elsewhere the torch reference, chunk by chunk. `auto` is `philox` on CUDA,
  `gaussian` elsewhere.

Memory: three chunk-sized buffers per lane (640 KiB at the default); no parameter-sized temporary is ever
made. A pass runs on one lane per CPU thread (see `Noise`), with the same result for any lane count.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from zofsdp import philox

_MASK64 = (1 << 64) - 1
KINDS = ("gaussian", "table", "philox")


def resolve_kind(kind: str, device: torch.device | str) -> str:
    """`auto` -> `philox` on CUDA (one fused launch per shard), `gaussian` elsewhere (faster on CPU)."""
    if kind == "auto":
        return "philox" if torch.device(device).type == "cuda" else "gaussian"
    return kind


def _philox_kernels(seed: int, device: torch.device):
    """The fused passes where they run: CUDA, or CPU under TRITON_INTERPRET=1 with ZOFSDP_PHILOX_KERNELS=1
    (tests). Elsewhere None: the chunked path draws z from the torch reference."""
    import os

    if device.type == "cuda" or os.environ.get("ZOFSDP_PHILOX_KERNELS") == "1":
        from zofsdp.kernels import PhiloxKernels

        return PhiloxKernels(seed)
    return None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers; stable across processes and Python versions."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h & ((1 << 63) - 1)


def block_id(name: str) -> int:
    """Stable id of a parameter from its name (never Python's salted `hash`)."""
    return zlib.crc32(name.encode())


@contextmanager
def one_thread(device: torch.device):
    """Run the noise pass's small ops on one CPU thread, then restore the thread count.

    Why: the generator is serial anyway (torch's CPU `randn`), and each elementwise op on a 256 KiB chunk
    is a few microseconds of work; split over the intra-op pool it pays a fork/join per op, and on a busy
    machine a join waits for a descheduled thread. Measured on 2 shared cores (docs/performance.md): the
    gaussian pass ran 3-15x faster, the table pass 5-10x. The forwards keep every thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ low-precision updates (bf16/fp16 shards)
# An update η·ĝ·z of 1e-6 is below half an ulp of most bf16 weights: round-to-nearest keeps ~3 % of it
# (docs/memory.md, "Precision modes"). Stochastic rounding keeps it in expectation. Its random bits must be
# the same on every layout, so, like z, they are a pure function of (seed, step, direction, block, global
# flat index): a counter-based hash, no generator state. The Triton `philox` kernel mirrors this rule.

ROUNDINGS = ("stochastic", "nearest")
LOW_PRECISION = (torch.bfloat16, torch.float16)
SR_TAG = 0x570C
"""Separates the rounding bits' key from z's key for the same (seed, step, direction, block)."""
_M32 = 0xFFFFFFFF


def sr_key(seed: int, key: tuple[int, ...]) -> int:
    """Key of one block's rounding bits: mix_seed(mix_seed(seed, step, direction, block), SR_TAG)."""
    return mix_seed(mix_seed(seed, *key), SR_TAG)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' hash-prospector 2-round xorshift-multiply, bias 0.021) on int64
    holding uint32 values. Both multipliers are < 2^31, so products stay below 2^63: no overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def sr_word(key: int, index: torch.Tensor) -> torch.Tensor:
    """32 random bits per global flat index (int64 in [0, 2^32)): hash(hash(i ^ k0) ^ k1), k0/k1 the
    low/high 32 bits of `key`. Indices must be < 2^32 (the largest tensor of a 175B model has 6.2e8)."""
    x = _hash32(index ^ (key & _M32))
    return _hash32(x ^ ((key >> 32) & _M32))


def round_to(x: torch.Tensor, dtype: torch.dtype, key: int, start: int, rounding: str = "stochastic"):
    """fp32 values x (global flat indices start, start+1, ...) rounded to `dtype` (bf16 or fp16).

    Stochastic: with r = the top bits of sr_word(key, i), add r below the target's last mantissa bit of
    x's fp32 pattern and truncate (sign-magnitude: the magnitude rounds up with probability
    (dropped part)/ulp, so E[result] = x). bf16 drops 16 bits; fp16 drops 13 where |x| >= 2^-14, and
    below that (fp16 subnormals, spacing 2^-24) rounds x·2^24 up with probability frac(x·2^24), with
    u = r16/2^16. Overflow to inf is left to the cast, as in round-to-nearest.
    """
    if rounding == "nearest" or dtype == torch.float32:
        return x.to(dtype)
    word = sr_word(key, torch.arange(start, start + x.numel(), device=x.device))
    bits = x.view(torch.int32).to(torch.int64)
    if dtype == torch.bfloat16:
        out = philox.fp32_from_bits((bits + (word >> 16)) & ~0xFFFF)
        return out.to(torch.bfloat16)  # exact: the low 16 bits are zero
    if dtype != torch.float16:
        raise ValueError(f"stochastic rounding to {dtype} is not defined")
    normal = philox.fp32_from_bits((bits + (word >> 19)) & ~0x1FFF)
    scaled = x * 2.0**24  # exact (a power of two)
    sub = torch.floor(scaled + (word >> 16).to(torch.float32) * 2.0**-16) * 2.0**-24
    return torch.where(x.abs() < 2.0**-14, sub, normal).to(torch.float16)


@dataclass(slots=True)
class Shard:
    """The part of one parameter tensor that this rank owns, as a flat view it may edit in place."""

    name: str
    data: torch.Tensor
    """1-D view of the local elements (no padding); in-place edits reach the model."""
    global_start: int
    """Flat index in the full tensor of data[0]."""
    full_numel: int
    """numel of the full (unsharded) tensor."""
    block_id: int
    decay: bool
    """Weight decay applies (weights of Linear/Embedding; never biases or norms)."""
    group: str
    """Layer this tensor belongs to: `embed`, `layers.<i>`, or `head` (final norm, lm head)."""

    @property
    def numel(self) -> int:
        return self.data.numel()


@dataclass(frozen=True, slots=True)
class Piece:
    """Where one chunk of z meets one shard: the global range [lo, hi) lies inside both."""

    shard: int
    """Index of the shard in the pass's list."""
    chunk: int
    """Chunk index in the tensor's global index space."""
    length: int
    """The chunk's full length (the last chunk of a tensor is shorter)."""
    lo: int
    hi: int


class _Lane:
    """One worker of a noise pass: its own generator and chunk-sized buffers (~640 KiB at the default)."""

    def __init__(self, chunk_numel: int, device: torch.device):
        self.generator = torch.Generator(device=device)
        self.host = self.generator if device.type == "cpu" else torch.Generator()
        """Draws the table offsets on the host: reading a device draw back would sync once per chunk."""
        self.buffer = torch.empty(chunk_numel, dtype=torch.float32, device=device)
        self.scaled = torch.empty(chunk_numel, dtype=torch.float32, device=device)
        self.rounded = torch.empty(chunk_numel, dtype=torch.bfloat16, device=device)
        self.chunks = 0

    def step(self, z: torch.Tensor, scale: float) -> torch.Tensor:
        """d = scale·z rounded to 8 significant bits (via bfloat16), in a reusable buffer.

        Why: added to an fp32 weight θ, such a d is a multiple of θ's ulp (unless |θ| > 2^15·|d|), so
        θ + d, θ + d − 2d and θ + d − 2d + d are all exact and the weight returns to its very bits,
        except where a step crosses a power of two (the lost bit cannot be recovered without storing it).
        With a full-precision d, rounding ties alone left ~11 % of fp32 weights one ulp off per step.
        The rounding is symmetric, so d/scale is z up to a relative 2^-9 of zero-mean error.
        """
        n = z.numel()
        d = torch.mul(z, scale, out=self.scaled[:n])
        self.rounded[:n].copy_(d)
        return d.copy_(self.rounded[:n])


def default_threads(device: torch.device | str) -> int:
    """Lanes for a noise pass: every intra-op thread on CPU (the forwards' pool, idle during the pass),
    one elsewhere (a GPU's kernels are already parallel)."""
    return max(1, min(torch.get_num_threads(), 8)) if torch.device(device).type == "cpu" else 1


class Noise:
    """Generates slices of z and applies `shard += scale * z` chunk by chunk, on `threads` lanes.

    A pass cuts its pieces into contiguous runs of about equal size, one per lane; lane 0 runs on the
    calling thread, the others on a small thread pool (torch ops release the GIL). Every chunk is drawn
    from its own seed and touches its own elements, so the result does not depend on the lane count.
    Torch's CPU generator is serial: lanes are how a pass uses more than one core.
    """

    def __init__(
        self,
        seed: int,
        *,
        kind: str = "gaussian",
        chunk_numel: int = 1 << 16,
        table_numel: int = 1 << 24,
        device: torch.device | str = "cpu",
        threads: int = 1,
        rounding: str = "stochastic",
    ):
        kind = resolve_kind(kind, device)
        if kind not in KINDS:
            raise ValueError(f"noise kind must be one of {', '.join(KINDS)} or 'auto', got {kind!r}")
        if threads < 1:
            raise ValueError(f"noise threads (zo.noise_threads) must be >= 1, or 0 for automatic; got {threads}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.seed = seed
        self.rounding = rounding
        """How updates of bf16/fp16 shards are rounded (fp32 shards are never rounded)."""
        self.kind = kind
        self.chunk_numel = chunk_numel
        self.device = torch.device(device)
        self.lanes = [_Lane(chunk_numel, self.device) for _ in range(threads)]
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="zofsdp-noise") if threads > 1 else None
        self.table = None
        if kind == "table":
            if table_numel < 2 * chunk_numel:
                raise ValueError("noise table must hold at least two chunks")
            generator = torch.Generator(device=self.device).manual_seed(mix_seed(seed, 0x7AB1E))
            self.table = torch.randn(table_numel, generator=generator, device=self.device)
        self.kernels = _philox_kernels(seed, self.device) if kind == "philox" else None
        """Fused Triton passes for `philox` (see _philox_kernels); None: the chunked path."""
        self._runs_cache: dict[tuple, list[list[Piece]]] = {}

    @property
    def num_chunks_generated(self) -> int:
        """Chunk draws so far: tests use it to prove skipped blocks cost nothing."""
        return sum(lane.chunks for lane in self.lanes)

    def _chunk(self, lane: _Lane, key: tuple[int, ...], chunk: int, length: int) -> torch.Tensor:
        """z for one chunk of `length` elements (the chunk's full length); key = (step, direction, block)."""
        lane.chunks += 1
        if self.kind == "philox":  # counter-based: the chunk is only a unit of work
            lo = chunk * self.chunk_numel
            return philox.normal(mix_seed(self.seed, *key), lo, lo + length, self.device)
        seed = mix_seed(self.seed, *key, chunk)
        if self.table is not None:
            high = self.table.numel() - length
            lane.host.manual_seed(seed)  # on CPU the lane's own generator: the same offsets as ever
            offset = int(torch.randint(0, high + 1, (1,), generator=lane.host))
            return self.table[offset : offset + length]
        lane.generator.manual_seed(seed)
        out = lane.buffer[:length]
        torch.randn(length, generator=lane.generator, out=out)
        return out

    def plan(self, shards: Sequence[Shard]) -> list[Piece]:
        """The pieces that tile every shard, in order. Pure index arithmetic: the same for every key."""
        c, pieces = self.chunk_numel, []
        for i, shard in enumerate(shards):
            start, stop = shard.global_start, shard.global_start + shard.numel
            for chunk in range(start // c, (stop + c - 1) // c):
                length = min(c, shard.full_numel - chunk * c)
                pieces.append(Piece(i, chunk, length, max(start, chunk * c), min(stop, chunk * c + length)))
        return pieces

    def _run(self, shards: Sequence[Shard], key: tuple[int, ...], apply) -> None:
        """For every piece: apply(lane, shard index, view of the shard, matching slice of z)."""
        runs = self._runs(shards)

        def work(lane: _Lane, run: list[Piece]) -> None:
            for p in run:
                shard = shards[p.shard]
                z = self._chunk(lane, (*key, shard.block_id), p.chunk, p.length)
                base = p.chunk * self.chunk_numel
                view = shard.data[p.lo - shard.global_start : p.hi - shard.global_start]
                apply(lane, p.shard, view, z[p.lo - base : p.hi - base])

        with one_thread(self.device):
            futures = [self._pool.submit(work, lane, run) for lane, run in zip(self.lanes[1:], runs[1:]) if run]
            try:
                work(self.lanes[0], runs[0])
            finally:
                wait(futures)  # every lane finishes before the pass returns, even when one fails
            for f in futures:
                f.result()  # re-raises a lane's error

    def _runs(self, shards: Sequence[Shard]) -> list[list[Piece]]:
        """The pass's pieces split over the lanes, cached per shard layout: OPT-30B on 8 ranks has ~57 k
        pieces per rank, and re-planning them every pass cost 1-3 us each (GPU-PATH.md section 3.1)."""
        layout = tuple((s.global_start, s.numel, s.full_numel, s.data.dtype) for s in shards)
        if layout not in self._runs_cache:
            if len(self._runs_cache) >= 64:  # masked passes (CurvZO, AdaLeZO) make many distinct lists
                self._runs_cache.clear()
            self._runs_cache[layout] = _split(self.plan(shards), len(self.lanes))
        return self._runs_cache[layout]

    def add_(self, shards: Sequence[Shard], key: tuple[int, ...], scale: float) -> None:
        """shard += d(scale·z) in place on every shard: a ZO probe's perturbation (exactly undone by -scale)."""
        if self.kernels is not None:
            return self.kernels.add_(shards, key, scale)
        self._run(shards, key, lambda lane, _, view, z: view.add_(lane.step(z, scale)))

    def restore_update_(self, shards: Sequence[Shard], key: tuple[int, ...], restore: float,
                        updates: Sequence[float], decays: Sequence[float]) -> None:
        """One pass: shard += d(restore·z) (undoes a probe), then shard <- decays[i]·shard + updates[i]·z
        (the optimizer step, weight decay included), per shard i."""
        if restore and any(s.data.dtype in LOW_PRECISION for s in shards):
            raise ValueError("a restore in place needs fp32 shards (low-precision shards are never perturbed)")
        if self.kernels is not None:  # one fused launch per shard; same rounding rules (philox.reference_pass)
            stochastic = self.rounding == "stochastic"
            return self.kernels.restore_update_(shards, key, restore, updates, decays, stochastic)

        def apply(lane: _Lane, i: int, view: torch.Tensor, z: torch.Tensor) -> None:
            if view.dtype in LOW_PRECISION:  # bf16/fp16 storage: fp32 arithmetic, then one rounding
                if decays[i] != 1.0 or updates[i]:
                    shard = shards[i]
                    lo = shard.global_start + view.storage_offset() - shard.data.storage_offset()  # 1-D views
                    x = view.float().mul_(decays[i]).add_(z, alpha=updates[i])
                    key_i = sr_key(self.seed, (*key, shard.block_id))
                    view.copy_(round_to(x, view.dtype, key_i, lo, self.rounding))
                return
            if restore:
                view.add_(lane.step(z, restore))
            if decays[i] != 1.0:
                view.mul_(decays[i])
            if updates[i]:
                view.add_(z, alpha=updates[i])

        self._run(shards, key, apply)

    def slice(self, shard: Shard, key: tuple[int, ...]) -> torch.Tensor:
        """The shard's slice of z as a new tensor (tests and small problems only: allocates)."""
        out = replace(shard, data=torch.zeros(shard.numel, dtype=torch.float32, device=self.device))
        self.restore_update_([out], key, 0.0, [1.0], [1.0])  # 0 + 1·z: exactly z
        return out.data


def _split(pieces: list[Piece], lanes: int) -> list[list[Piece]]:
    """Contiguous runs of about equal element counts, one per lane (contiguous: each lane streams memory)."""
    if lanes == 1:
        return [pieces]
    total = sum(p.hi - p.lo for p in pieces)
    runs, done = [[] for _ in range(lanes)], 0
    for p in pieces:
        runs[min(done * lanes // max(total, 1), lanes - 1)].append(p)
        done += p.hi - p.lo
    return runs
