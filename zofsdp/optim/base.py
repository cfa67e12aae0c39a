"""What every ZO optimizer shares: the shards it may edit, the noise, and the loss oracle.

An optimizer never sees the model or the backend. `loss_fn()` runs one forward pass of the whole global
batch (each rank its slice) and returns the mean loss, already all-reduced: the same float on every rank
(in training a `scoring.PendingLoss`, read on first use, so read a loss only once every probe is queued).
Everything an optimizer decides from it is therefore identical on every rank without further traffic.
`loss_fn(batch=k)` (k >= 1) scores this step's k-th extra batch instead, drawn by the trainer from the seed,
the step and k (DiZO's search); `decide(loss_fn, floats)` puts floats decided from the losses in the seed log.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from zofsdp.config import ZOConfig
from zofsdp.noise import LOW_PRECISION, Noise, Shard, default_threads
from zofsdp.optim.probe import Probe

LossFn = Callable[..., float]


def decide(loss_fn: LossFn, values: list[float]) -> list[float]:
    """`values`, floats the optimizer decided from the losses (DiZO's projection factors), logged after the
    losses so far: training's oracle logs them and returns them, replay's returns the logged ones (a
    replayed sharded run applies the run's own bits). Oracles without `decide` (toys) return `values`."""
    hook = getattr(loss_fn, "decide", None)
    return hook(values) if hook is not None else values


class ZOOptimizer:
    def __init__(self, shards: list[Shard], cfg: ZOConfig, seed: int, device: torch.device | str = "cpu",
                 blocks: list[tuple[str, int, str]] | None = None, probe: Probe | None = None,
                 rounding: str = "stochastic", all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not shards:
            raise ValueError("no parameters to optimize on this rank")
        low = sorted({str(s.data.dtype) for s in shards if s.data.dtype in LOW_PRECISION})
        if low and probe is None:
            raise ValueError(f"shards in {', '.join(low)} cannot be perturbed in place (+εz, −2εz, +εz does "
                             "not restore them): build the optimizer with the backend's probe")
        self.probe = probe
        """Set: probes go to the gathered parameters through the backend's hooks, never to the shards."""
        self.all_reduce = all_reduce or (lambda t: t)
        """Sums a tensor over ranks in place (the backend's all_reduce_sum; LOREN's column sums); identity
        on one process. Everything else an optimizer needs from other ranks comes through the losses."""
        self.shards = shards
        # (name, full numel, group) of every parameter, identical on every rank: samplers index blocks by
        # it, since a rank's shards can miss a tensor it owns no rows of. Default: what the shards show.
        self.blocks = blocks or [(s.name, s.full_numel, s.group) for s in shards]
        self.cfg = cfg
        self.seed = seed
        self.noise = Noise(seed, kind=cfg.noise, chunk_numel=cfg.chunk_numel, table_numel=cfg.table_numel,
                           device=device, threads=cfg.noise_threads or default_threads(device),
                           rounding=rounding)
        if probe is not None:
            probe.noise = self.noise

    def step(self, loss_fn: LossFn, step: int) -> dict:
        """One update; returns at least `loss`, `projected_grad` and `forward_passes` (this step)."""
        raise NotImplementedError

    def perturb(self, shards: list[Shard], key: tuple[int, ...], scale: float,
                names: list[str] | None = None) -> None:
        """θ += scale·z on each shard (exactly undone by the opposite scale; see noise._Lane.step).

        With a probe, only the forwards see it (on the gathered tensors `names`: default the shards'
        names; pass every rank's full list when a rank may own no rows of a perturbed tensor)."""
        if self.probe is not None:
            self.probe.shift(names if names is not None else [s.name for s in shards], key, scale)
            return
        self.noise.add_(shards, key, scale)

    def restore_and_update(self, shards: list[Shard], key: tuple[int, ...], restore: float,
                           grad_scale: float | Callable[[Shard], float]) -> None:
        """One pass: undo a `-restore * z` perturbation exactly, then θ ← θ(1 − lr·λ) − lr·ĝ·z.

        λ applies only to shards flagged `decay` (weight matrices). `grad_scale` is ĝ, or a function of
        the shard for per-block weights (importance sampling).
        """
        lr, wd = self.cfg.lr, self.cfg.weight_decay
        if self.probe is not None:  # the shards were never perturbed: end the probe, write the update only
            self.probe.shift(self.probe.names, key, restore)
            restore = 0.0
        updates = [-lr * (grad_scale(s) if callable(grad_scale) else grad_scale) for s in shards]
        decays = [1.0 - lr * wd if s.decay and wd else 1.0 for s in shards]
        self.noise.restore_update_(shards, key, restore, updates, decays)

    @staticmethod
    def finite(*values: float) -> bool:
        return all(math.isfinite(v) for v in values)

    def state_dict(self) -> dict:
        """Optimizer state beyond the parameters (scores, rewards); empty for MeZO."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (checkpoints); MeZO has nothing to restore."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds "
                             f"{state.get('optimizer', 'another optimizer')}'s")

    def check_state(self, state: dict, section: str, names: list[str]) -> dict:
        """`state[section]` after checking it is this optimizer's, over the same blocks in the same order."""
        mine = type(self).__name__.lower()
        if state.get("optimizer") != mine:
            raise ValueError(f"the checkpoint's optimizer state is {state.get('optimizer') or 'MeZO'}'s, "
                             f"not {mine}'s: resume with the zo.optimizer that wrote it")
        saved = list(state[section])
        if saved != names:
            raise ValueError(f"the checkpoint's {mine} blocks differ from this model's ({len(saved)} vs "
                             f"{len(names)}; granularity or model changed)")
        return state[section]
