"""Shared pieces of the sparse ZO optimizers (CurvZO, AdaLeZO): the block table and seeded draws.

Every decision here must come out identical on every rank. Two rules make sure of it:
- the block table is built from the *full* parameter list (name, full numel, layer group), never from the
  shards a rank happens to own (a rank may own no rows of a small tensor, and `Backend.shards()` drops
  those), so sizes, order and indices agree everywhere;
- all sampling maths runs on the CPU in float64 from a generator seeded by `mix_seed(seed, step, tag)`,
  and the only inputs that change over time are the all-reduced scalar losses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from zofsdp.noise import Shard, mix_seed

BlockSpec = tuple[str, int, str]
"""(parameter name, full numel, layer group): one row of the full parameter list, the same on every rank."""


def blocks_from_shards(shards: list[Shard]) -> list[BlockSpec]:
    """The block list seen from local shards: correct when every rank owns a piece of every tensor
    (always true on one rank). Sharded runs should pass the backend's full list instead."""
    return [(s.name, s.full_numel, s.group) for s in shards]


@dataclass(slots=True)
class Units:
    """Sampling units (a tensor, or a layer = several tensors) and which unit each parameter belongs to."""

    names: list[str]
    sizes: torch.Tensor
    """float64 [U]: full numel of each unit (the same on every rank)."""
    unit_of: dict[str, int]
    """parameter name -> unit index."""

    @property
    def total(self) -> float:
        return float(self.sizes.sum())

    def fraction(self, per_unit: torch.Tensor) -> float:
        """Σ n_b·x_b / Σ n_b: the fraction of parameters kept by a 0/1 mask, or expected under probabilities."""
        return float((self.sizes * per_unit).sum()) / self.total


def build_units(blocks: list[BlockSpec], granularity: str) -> Units:
    """One unit per tensor (`tensor`) or per layer group (`layer`), in model order."""
    names: list[str] = []
    sizes: list[int] = []
    unit_of: dict[str, int] = {}
    index: dict[str, int] = {}
    for name, numel, group in blocks:
        key = name if granularity == "tensor" else group
        if key not in index:
            index[key] = len(names)
            names.append(key)
            sizes.append(0)
        sizes[index[key]] += numel
        unit_of[name] = index[key]
    return Units(names, torch.tensor(sizes, dtype=torch.float64), unit_of)


def read_probs(path: str, units: Units, granularity: str) -> torch.Tensor:
    """Keep probabilities per unit from a JSON file: {"unit": π} naming every unit, or a landscape bench
    JSON (its best sampler from Fisher traces, no budget, at this granularity). Errors say what to fix."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"zo.curvzo.probs_file {path!r} does not exist")
    data = json.loads(file.read_text())
    if "landscape" in data:
        if granularity not in data["landscape"]:
            raise ValueError(f"{path}: the landscape JSON has no {granularity!r} units (zo.curvzo.granularity)")
        table = data["landscape"][granularity]
        data = dict(zip(table["names"], table["fisher"]["best"]["none"]["pi"]))
    missing = [n for n in units.names if n not in data]
    if missing or any(not 0 < float(data[n]) <= 1 for n in units.names):
        raise ValueError(f"{path} must give every unit a keep probability in (0, 1]; missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} of {len(units.names)} {granularity} units")
    return torch.tensor([float(data[n]) for n in units.names], dtype=torch.float64)


def generator(seed: int, step: int, tag: int) -> torch.Generator:
    """A CPU generator for one step's draw; `tag` keeps different draws of the same step independent."""
    return torch.Generator().manual_seed(mix_seed(seed, step, tag))


def budgeted_probs(weights: torch.Tensor, sizes: torch.Tensor, budget: float, pi_min: float) -> torch.Tensor:
    """π = clip(c·w, π_min, 1) with c chosen so that Σ n·π = budget·Σ n (water-filling).

    mass(c) = Σ n·clip(c·w, π_min, 1) is continuous, non-decreasing and linear between the breakpoints
    c = π_min/w and c = 1/w, so we evaluate it at every breakpoint, find the segment that crosses the
    target and solve it exactly. Clipping both ends and re-solving for c is the "re-normalise after
    clipping" of the sampling rule, done in one go.
    """
    if budget >= 1.0:
        return torch.ones_like(weights)
    w = weights.clamp_min(0)
    if float(w.max()) <= 0:
        w = torch.ones_like(weights)
    target = budget * float(sizes.sum())

    def mass(c: torch.Tensor) -> torch.Tensor:  # c: [K] candidate scales -> [K] masses
        return (sizes[:, None] * (w[:, None] * c[None, :]).clamp(pi_min, 1.0)).sum(dim=0)

    positive = w[w > 0]
    knots = torch.cat([torch.zeros(1, dtype=w.dtype), pi_min / positive, 1.0 / positive]).unique()  # sorted
    masses = mass(knots)
    if float(masses[-1]) <= target:  # even saturating every weighted unit cannot spend the budget
        return (w * knots[-1]).clamp(pi_min, 1.0)
    i = int(torch.searchsorted(masses, torch.tensor([target], dtype=masses.dtype)))
    if i == 0:  # the floor π_min alone already spends the budget
        return torch.full_like(w, pi_min)
    c0, c1, m0, m1 = knots[i - 1], knots[i], masses[i - 1], masses[i]
    c = c0 + (c1 - c0) * (target - m0) / (m1 - m0)
    return (w * c).clamp(pi_min, 1.0)


def concentration(scores: torch.Tensor) -> tuple[float, float]:
    """(d_eff / G, normalised entropy H) of non-negative scores: both 1 when flat, → 1/G and 0 when one
    unit holds everything."""
    p = scores.clamp_min(0)
    total = float(p.sum())
    g = p.numel()
    if total <= 0 or g < 2:
        return 1.0, 1.0
    p = p / total
    d_eff = 1.0 / float((p * p).sum())
    nz = p[p > 0]
    entropy = -float((nz * nz.log()).sum()) / math.log(g)
    return d_eff / g, entropy


def local_shards_by_unit(shards: list[Shard], units: Units, keep: torch.Tensor) -> list[Shard]:
    """This rank's shards of the kept units (others are not touched in any pass)."""
    return [s for s in shards if bool(keep[units.unit_of[s.name]])]
