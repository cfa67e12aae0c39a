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

Memory: three chunk-sized buffers (under 1 MiB at the default); no parameter-sized temporary is ever made.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


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


class Noise:
    """Generates slices of z and applies `shard += scale * z` chunk by chunk."""

    def __init__(
        self,
        seed: int,
        *,
        kind: str = "gaussian",
        chunk_numel: int = 1 << 16,
        table_numel: int = 1 << 24,
        device: torch.device | str = "cpu",
    ):
        if kind not in ("gaussian", "table"):
            raise ValueError(f"noise kind must be 'gaussian' or 'table', got {kind!r}")
        self.seed = seed
        self.kind = kind
        self.chunk_numel = chunk_numel
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.buffer = torch.empty(chunk_numel, dtype=torch.float32, device=self.device)
        self.scaled = torch.empty(chunk_numel, dtype=torch.float32, device=self.device)
        self.rounded = torch.empty(chunk_numel, dtype=torch.bfloat16, device=self.device)
        self.num_chunks_generated = 0
        """Counts chunk draws: tests use it to prove skipped blocks cost nothing."""
        self.table = None
        if kind == "table":
            if table_numel < 2 * chunk_numel:
                raise ValueError("noise table must hold at least two chunks")
            self.generator.manual_seed(mix_seed(seed, 0x7AB1E))
            self.table = torch.randn(table_numel, generator=self.generator, device=self.device)

    def _chunk(self, key: tuple[int, ...], chunk: int, length: int) -> torch.Tensor:
        """z for one chunk of `length` elements (the chunk's full length)."""
        self.num_chunks_generated += 1
        self.generator.manual_seed(mix_seed(self.seed, *key, chunk))
        if self.table is not None:
            high = self.table.numel() - length
            offset = int(torch.randint(0, high + 1, (1,), generator=self.generator, device=self.device))
            return self.table[offset : offset + length]
        out = self.buffer[:length]
        torch.randn(length, generator=self.generator, out=out)
        return out

    def pieces(self, shard: Shard, key: tuple[int, ...]):
        """Yield (local slice, z slice) pairs that tile the shard; key = (step, direction)."""
        start, stop = shard.global_start, shard.global_start + shard.numel
        c = self.chunk_numel
        for chunk in range(start // c, (stop + c - 1) // c):
            chunk_start = chunk * c
            length = min(c, shard.full_numel - chunk_start)
            z = self._chunk((*key, shard.block_id), chunk, length)
            lo, hi = max(start, chunk_start), min(stop, chunk_start + length)
            yield slice(lo - start, hi - start), z[lo - chunk_start : hi - chunk_start]

    def _step(self, z: torch.Tensor, scale: float) -> torch.Tensor:
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

    def add_(self, shard: Shard, key: tuple[int, ...], scale: float) -> None:
        """shard += d(scale·z) in place: the perturbation of a ZO probe (exactly undone by -scale)."""
        with one_thread(self.device):
            for local, z in self.pieces(shard, key):
                shard.data[local].add_(self._step(z, scale))

    def restore_update_(self, shard: Shard, key: tuple[int, ...], restore: float, update: float,
                        decay: float = 1.0) -> None:
        """One pass over the shard: shard += d(restore·z) (undoes a probe), then
        shard <- decay·shard + update·z (the optimizer step, weight decay included)."""
        with one_thread(self.device):
            for local, z in self.pieces(shard, key):
                view = shard.data[local]
                if restore:
                    view.add_(self._step(z, restore))
                if decay != 1.0:
                    view.mul_(decay)
                if update:
                    view.add_(z, alpha=update)

    def slice(self, shard: Shard, key: tuple[int, ...]) -> torch.Tensor:
        """The shard's slice of z as a new tensor (tests and small problems only: allocates)."""
        out = torch.empty(shard.numel, dtype=torch.float32, device=self.device)
        for local, z in self.pieces(shard, key):
            out[local] = z
        return out
