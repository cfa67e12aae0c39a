"""Fused `philox` noise passes: at most one kernel launch per shard per pass, small shards grouped.

`PhiloxKernels` runs a pass (perturb, or restore + update + decay, optionally with stochastic rounding)
over a list of shards: every shard of at least `group_min` elements gets its own launch of
`shard_kernel`; the smaller ones (norms, biases) of one dtype share a single launch of `group_kernel`,
which reads each program's shard from a table of addresses. Per-shard scalars make the masked
(CurvZO/AdaLeZO: only the chosen shards are in the list) and weighted (per-shard ĝ·w) passes one launch
each. The z of every element is `zofsdp.philox`'s, so a shard is generated wherever it starts.

Triton is imported on first use only: the package imports, and the CPU path runs, without it. Under
`TRITON_INTERPRET=1` the same kernels run on CPU tensors (the tests do that).

Launch planning (`plan_launches`) is pure arithmetic on the shards' sizes and dtypes, so the bench can
count the launches of a 30B layout on the meta device without Triton or a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zofsdp import philox
from zofsdp.noise import Shard, mix_seed

BLOCK = 256
"""Philox counters per program (4·BLOCK elements). Any value gives the same numbers."""
PLAN_CACHE = 8
"""Launch plans kept (one per shard list): see PhiloxKernels._plan."""
GROUP_MIN = 1 << 16
"""Shards smaller than this share one grouped launch per dtype (their own launch would be mostly idle)."""
STORES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class LaunchPlan:
    """Which shards get their own launch and which are grouped (by dtype), for one shard list."""

    single: tuple[int, ...]
    """Indices of shards with their own launch."""
    groups: tuple[tuple[int, ...], ...]
    """Indices of the shards of each grouped launch (one group per dtype)."""

    @property
    def num_launches(self) -> int:
        return len(self.single) + len(self.groups)


def plan_launches(numels: Sequence[int], dtypes: Sequence[torch.dtype], group_min: int = GROUP_MIN) -> LaunchPlan:
    """Big shards alone, small ones grouped per dtype; empty shards need nothing."""
    single, grouped = [], {}
    for i, (numel, dtype) in enumerate(zip(numels, dtypes)):
        if numel == 0:
            continue
        if numel >= group_min:
            single.append(i)
        else:
            grouped.setdefault(dtype, []).append(i)
    # A group of one is launched alone: same count, no tables (probes pass one gathered tensor at a time).
    single += [g[0] for g in grouped.values() if len(g) == 1]
    groups = tuple(tuple(g) for g in grouped.values() if len(g) > 1)
    return LaunchPlan(tuple(sorted(single)), groups)


def num_tiles(numel: int, start: int, block: int = BLOCK) -> int:
    """Programs for one shard: its counters [start // 4, ceil((start + numel) / 4)) in tiles of `block`."""
    counters = (start + numel + 3) // 4 - start // 4
    return -(-counters // block)


def _split(key: int) -> tuple[int, int]:
    return philox.split_key(key)


class PhiloxKernels:
    """The GPU (or interpreter) side of `Noise(kind="philox")`; same signatures as Noise's passes."""

    def __init__(self, seed: int, block: int = BLOCK, group_min: int = GROUP_MIN):
        from zofsdp import _triton_noise  # noqa: F401  (fails here, clearly, when Triton is missing)

        self.seed = seed
        self.block = block
        self.group_min = group_min
        self.num_launches = 0
        """Kernel launches so far (the bench and tests count them)."""
        self._plans: dict[tuple, tuple[LaunchPlan, dict]] = {}

    # ------------------------------------------------------------------ planning (cached per shard list)
    def _plan(self, shards: Sequence[Shard]) -> tuple[LaunchPlan, dict]:
        signature = tuple((s.data.data_ptr(), s.numel, s.global_start, s.data.dtype) for s in shards)
        if signature not in self._plans:
            # A dense step reuses one list; a masked step (CurvZO, AdaLeZO) makes a new one that its own
            # passes share. Each plan holds small device tables (+2,560 B per masked step for SmolLM2 on an
            # H100, docs/gpu_check.md): keep a few, or they count as growth in the memory report.
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            plan = plan_launches([s.numel for s in shards], [s.data.dtype for s in shards], self.group_min)
            self._plans[signature] = (plan, {g: self._tables(shards, g) for g in plan.groups})
        return self._plans[signature]

    def _tables(self, shards: Sequence[Shard], group: tuple[int, ...]) -> dict:
        """The static tables of a grouped launch, on the device once per shard list."""
        device = shards[group[0]].data.device
        tile_shard, tile_counter = [], []
        for j, i in enumerate(group):
            s = shards[i]
            first = s.global_start // 4
            for t in range(num_tiles(s.numel, s.global_start, self.block)):
                tile_shard.append(j)
                tile_counter.append(first + t * self.block)

        def ints(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        return {"tile_shard": ints(tile_shard), "tile_counter": ints(tile_counter),
                "addrs": ints([shards[i].data.data_ptr() for i in group]),
                "numels": ints([shards[i].numel for i in group]),
                "starts": ints([shards[i].global_start for i in group])}

    # ------------------------------------------------------------------ passes
    def add_(self, shards: Sequence[Shard], key: tuple[int, ...], scale: float) -> None:
        """shard += d(scale·z): the probe's perturbation, exactly undone by -scale in fp32."""
        self._pass(shards, key, mode=0, perturb=scale, restore=0.0,
                   updates=[0.0] * len(shards), decays=[1.0] * len(shards), stochastic=False)

    def restore_update_(self, shards: Sequence[Shard], key: tuple[int, ...], restore: float,
                        updates: Sequence[float], decays: Sequence[float], stochastic: bool = False) -> None:
        """shard += d(restore·z); shard *= decay_i; shard += update_i·z (stochastic rounding on request)."""
        self._pass(shards, key, mode=1, perturb=0.0, restore=restore, updates=updates, decays=decays,
                   stochastic=stochastic)

    def _pass(self, shards, key, *, mode, perturb, restore, updates, decays, stochastic) -> None:
        from zofsdp import _triton_noise as tn

        plan, tables = self._plan(shards)
        keys = [mix_seed(self.seed, *key, s.block_id) for s in shards]
        has_decay = mode == 1 and any(d != 1.0 for d in decays)
        for i in plan.single:
            s = shards[i]
            store = self._store(s.data.dtype)
            k0, k1 = _split(keys[i])
            r0, r1 = _split(philox.sr_key(keys[i]))
            grid = (num_tiles(s.numel, s.global_start, self.block),)
            tn.shard_kernel[grid](s.data, s.numel, s.global_start, k0, k1, r0, r1, perturb, restore,
                                  updates[i], decays[i], BLOCK=self.block, MODE=mode, STORE=store,
                                  SR=stochastic and store > 0, HAS_RESTORE=bool(restore),
                                  HAS_DECAY=decays[i] != 1.0)
            self.num_launches += 1
        for group in plan.groups:
            t = tables[group]
            store = self._store(shards[group[0]].data.dtype)
            key_table = [(*_split(keys[i]), *_split(philox.sr_key(keys[i]))) for i in group]
            device = shards[group[0]].data.device
            key_t = torch.tensor(key_table, dtype=torch.int64).to(device, non_blocking=True)
            scalars = torch.tensor([(perturb, restore, updates[i], decays[i]) for i in group],
                                   dtype=torch.float32).to(device, non_blocking=True)
            grid = (t["tile_shard"].numel(),)
            tn.group_kernel[grid](t["tile_shard"], t["tile_counter"], t["addrs"], t["numels"], t["starts"],
                                  key_t, scalars, BLOCK=self.block, MODE=mode, STORE=store,
                                  SR=stochastic and store > 0, HAS_RESTORE=bool(restore), HAS_DECAY=has_decay)
            self.num_launches += 1

    @staticmethod
    def _store(dtype: torch.dtype) -> int:
        if dtype not in STORES:
            raise ValueError(f"philox kernels handle float32, bfloat16 and float16 shards, not {dtype}")
        return STORES[dtype]
