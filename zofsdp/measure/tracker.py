"""Peak memory of an inference forward and of a ZO step, by category, from PyTorch's memory trackers.

Shared by the real measurement (`zofsdp memory -c ...`) and the simulation (`--simulate`), so both count
the same way. `MemTracker` (one process) and `FSDPMemTracker` (FSDP2) see every tensor storage created
while they are entered and label it; a storage freed at any time is subtracted. Entering a tracker resets
its peak to the current total, so each *phase* is measured by entering and leaving it:

- a forward pass (inference, or one of the ZO step's forwards),
- an update phase (the optimizer's own work between forwards: perturb, restore, update).

The ZO step's peak is the largest phase peak. Categories reported:
sharded_params, gathered_params, activations, optimizer_state, noise_buffers, other.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

CATEGORIES = ("sharded_params", "gathered_params", "activations", "optimizer_state", "noise_buffers", "other")

# Tracker labels (the `.value` of torch's _MemRefType / _FSDPRefType) -> our categories.
_LABELS = {
    "Parameter": "sharded_params",  # MemTracker, one process: the whole model is this rank's "shard"
    "Sharded Param": "sharded_params",
    "Unsharded Param": "gathered_params",
    "All Gather": "gathered_params",
    "Activation": "activations",  # everything ops create outside a backward; relabelled below
    "Temp": "other",
    "Buffer": "other",
    "Inputs": "other",
    "Other": "other",
    "Optstate": "optimizer_state",
    "OptState": "optimizer_state",
}


def make_tracker(model: nn.Module):
    """FSDPMemTracker for an FSDP2 model, else MemTracker with the model's parameters registered."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        return FSDPMemTracker(model)
    from torch.distributed._tools.mem_tracker import MemTracker

    class NoGradMemTracker(MemTracker):
        # MemTracker hooks every parameter's gradient on each forward, which raises for parameters
        # that do not require one (ours never do). Same tracking, without the gradient hooks.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    tracker = NoGradMemTracker()
    tracker.track_external(model)  # parameters exist before the tracker: register them as such
    # ZeRO-3 keeps the weights in each parameter's `ds_tensor` (the partition), not in the parameter the
    # module holds: register them too, or a forward would not count them while a step, whose noise pass
    # writes them, would (a whole partition of false "step overhead").
    partitions = [p.ds_tensor for p in model.parameters() if getattr(p, "ds_tensor", None) is not None]
    if partitions:
        tracker.track_external(*partitions)
    return tracker


def _device_snapshot(snapshot: dict) -> dict[str, int]:
    """The busiest device's {label: bytes} (CPU for CPU and fake runs, the GPU on CUDA)."""
    if not snapshot:
        return {"Total": 0}
    device = max(snapshot, key=lambda d: snapshot[d].get("Total", 0))
    return {getattr(k, "value", k): v for k, v in snapshot[device].items()}


def tensor_bytes(obj, skip: tuple[type, ...] = (), depth: int = 3, seen: set | None = None) -> int:
    """Bytes of the tensors reachable from obj through attributes, dicts and lists (storages counted once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage()._cdata  # the storage's identity (fake tensors have no data_ptr)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if depth == 0 or isinstance(obj, (nn.Module, *skip)) or obj is None:
        return 0
    if isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        children = obj
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return 0
    return sum(tensor_bytes(c, skip, depth - 1, seen) for c in children)


def optimizer_bytes(optimizer) -> tuple[int, int]:
    """(optimizer state, noise buffers) held by a ZO optimizer between steps; shards are not state."""
    from zofsdp.noise import Noise, Shard

    noise_bytes = tensor_bytes(vars(optimizer.noise))  # chunk buffers, and the table when noise=table
    state = {k: v for k, v in vars(optimizer).items() if k not in ("shards", "noise", "cfg")}
    return tensor_bytes(state, skip=(Shard, Noise)), noise_bytes


@dataclass
class Peak:
    """One phase's peak: total bytes and the categories at that moment."""

    phase: str
    total: int
    breakdown: dict[str, int]


def _peak(tracker, phase: str, persistent: tuple[int, int] = (0, 0)) -> Peak:
    """The tracker's peak since it was entered, in our categories.

    `persistent` = (optimizer state, noise buffer) bytes that the optimizer made while the tracker was
    entered: the tracker labels them "Activation"; we move them to their own categories. In an update
    phase, what remains under "Activation" is the optimizer's temporaries, so it goes to "other".
    """
    raw = _device_snapshot(tracker.get_tracker_snapshot("peak"))
    out = dict.fromkeys(CATEGORIES, 0)
    for label, value in raw.items():
        if label != "Total" and value:
            out[_LABELS.get(label, "other")] += value
    opt_state, noise = persistent
    out["activations"] -= opt_state + noise
    out["optimizer_state"] += opt_state
    out["noise_buffers"] += noise
    if phase == "update":
        out["other"] += out["activations"]
        out["activations"] = 0
    return Peak(phase, raw.get("Total", 0), out)


def _current_total(tracker) -> int:
    return _device_snapshot(tracker.get_tracker_snapshot("current")).get("Total", 0)


def measure_inference(tracker, forward: Callable[[], float], forward_mode=nullcontext) -> Peak:
    """Peak of one forward (the caller has already run a warm-up forward outside the tracker).

    `forward_mode` is entered around the tracker for forwards: the simulation's FakeTensorMode (a tracker
    counts only ops that run under the fake mode that was active when it was entered).
    """
    # Two tracked forwards, the second measured: tensors that a forward leaves behind (caches that the
    # next forward replaces) must be known to the tracker, or inference would look smaller than the
    # ZO step's forwards for reasons that have nothing to do with the optimizer.
    for _ in range(2):
        tracker.reset_mod_stats()
        with forward_mode(), tracker:
            forward()
    return _peak(tracker, "forward")


@dataclass
class StepRecord:
    peak: Peak
    phases: list[Peak]
    current_after: int
    """Tracked bytes alive after the step: constant from step to step unless something leaks."""


@dataclass
class OptimizerMeasurement:
    name: str
    steps: list[StepRecord] = field(default_factory=list)
    optimizer_state_bytes: int = 0
    noise_buffer_bytes: int = 0


def measure_optimizer(tracker, name: str, build: Callable[[], object], forward: Callable[[], float],
                      num_steps: int = 1, first_step: int = 1, forward_mode=nullcontext) -> OptimizerMeasurement:
    """Build optimizer `name` inside the tracker, run `num_steps` steps, record each step's peak.

    The optimizer's persistent tensors (noise buffer, state) count in every step: a ZO step's memory is
    everything alive while it runs, not only what it allocates.
    """
    with tracker:
        optimizer = build()
    opt_state, noise = optimizer_bytes(optimizer)
    result = OptimizerMeasurement(name, optimizer_state_bytes=opt_state, noise_buffer_bytes=noise)
    for step in range(first_step, first_step + num_steps):
        phases = _run_step(tracker, optimizer, forward, step, (opt_state, noise), forward_mode)
        best = max(phases, key=lambda p: p.total)
        gc.collect()  # garbage in reference cycles is freed when the collector happens to run: not a leak
        result.steps.append(StepRecord(best, phases, _current_total(tracker)))
    del optimizer
    gc.collect()
    return result


def _run_step(tracker, optimizer, forward, step: int, persistent: tuple[int, int], forward_mode) -> list[Peak]:
    """One optimizer step; the tracker is left and re-entered around each forward to split the phases."""
    phases: list[Peak] = []

    # DiZO's search batches: the one measured batch stands in; no per-example rows (snr_rows then skips a score)
    def loss_fn(batch: int = 0, per_example: bool = False) -> float:
        tracker.__exit__(None, None, None)
        phases.append(_peak(tracker, "update", persistent))
        try:
            tracker.reset_mod_stats()  # FSDPMemTracker refuses a second forward without this
            with forward_mode(), tracker:
                loss = forward()
            phases.append(_peak(tracker, "forward", persistent))
        finally:
            # Per-module statistics are not used here, and every op would walk them: drop them.
            tracker.reset_mod_stats()
            tracker.__enter__()  # the optimizer's `with tracker` expects to leave an entered tracker
        return loss

    tracker.reset_mod_stats()
    with tracker, torch.no_grad():
        optimizer.step(loss_fn, step)
    phases.append(_peak(tracker, "update", persistent))
    return phases


def synthetic_batch(vocab_size: int, rows: int, seq_len: int, seed: int = 0):
    """A [rows, seq_len] batch of random tokens, two candidate answers: a fixed shape for comparisons."""
    from zofsdp.scoring import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=g)
    mask = torch.ones(rows, seq_len, dtype=torch.long)
    positions = torch.arange(seq_len).expand(rows, seq_len).contiguous()
    candidates = torch.randint(0, vocab_size, (rows, 2), generator=g)
    return Batch(ids, mask, positions, candidates, torch.ones(rows, 2, dtype=torch.bool),
                 torch.zeros(rows, dtype=torch.long))


def fake_losses() -> Callable[[], float]:
    """Deterministic, slightly different losses for runs whose forwards return no real values."""
    counter = itertools.count()
    return lambda: 1.0 + 0.01 * (next(counter) % 3)
