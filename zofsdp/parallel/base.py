"""The one small interface between the ZO optimizers and how the model is laid out across ranks.

Optimizers see only `shards()` (flat, editable views of what this rank owns, each with its global offset)
and `all_reduce_sum` for scalars. They never import FSDP or DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import socket
from abc import ABC, abstractmethod
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from zofsdp.models import param_info
from zofsdp.noise import Shard, block_id

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """Join (or, for a lone `python` run, create) the process group; returns rank, world size, device.

    The device is set before the group exists, so that NCCL and the first collectives use this rank's own
    GPU instead of guessing one (../shared/GPU-PATH.md §4.3). `timeout_minutes` bounds how long any rank waits
    in a collective: NCCL's default of 10 minutes is shorter than a 30B checkpoint's slowest read or write.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # started by plain python: a one-rank group
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **_attempt_store(timeout))
    return dist.get_rank(), dist.get_world_size(), device


def _attempt_store(timeout: timedelta) -> dict:
    """After torchrun restarted the group (--max-restarts), this attempt's own key space in the store: the
    agent's store still holds the dead attempt's addresses, and gloo then connects to a dead rank's port
    ("connectFullMesh failed ... Connection refused"; seen with torch 2.13, cf. pytorch#167288)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not attempt:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"zofsdp_attempt_{attempt}", store), "rank": rank, "world_size": world_size}


class Backend(ABC):
    """How parameters are laid out over ranks, and the scalar all-reduce."""

    name: str
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    load_report: dict | None = None
    """Host memory while the model loaded (zofsdp.measure.host), with this rank's shard and largest tensor."""

    def load_model(self, cfg, vocab_size: int) -> nn.Module:
        """Build the model on this rank (FSDP2 and DeepSpeed override this to load straight into shards)."""
        from zofsdp.models import load_model

        return self._measure_load(lambda: load_model(cfg, vocab_size, device="cpu"))

    def _measure_load(self, load) -> nn.Module:
        """Run `load()` under the host-memory sampler; keep the figures in `load_report` and log them."""
        from zofsdp.loading import largest_tensor_bytes, shard_bytes
        from zofsdp.measure.host import MIB, host_peak

        with host_peak() as peak:
            model = load()
        self.load_report = {**peak.as_dict(), "shard_bytes": shard_bytes(model),
                            "largest_tensor_bytes": largest_tensor_bytes(model)}
        log.info("rank %d loaded the model in %.1f s: host peak +%.0f MiB (anonymous), shard %.0f MiB",
                 self.rank, peak.seconds, peak.peak_above_baseline / MIB, self.load_report["shard_bytes"] / MIB)
        return model

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard (or not) the model; returns the module to call for forwards."""

    @abstractmethod
    def local_params(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """(name, flat local view, global flat start, full numel) per parameter tensor, in model order."""

    def full_tensors(self, owners: list[tuple[str, int]]):
        """For (state-dict key, owner rank) in order: yield (key, whole tensor on the owner, None elsewhere).
        Every rank must iterate the same list (the gathers are collective). Use each tensor before asking
        for the next: it may be freed then."""
        from zofsdp.saving import gather_to

        state = self.model.state_dict(keep_vars=True)
        for key, owner in owners:
            yield key, gather_to(state[key], owner, self.rank, self.world_size)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor of scalars over ranks (the only traffic a ZO step adds)."""
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def shards(self) -> list[Shard]:
        info = self._param_info
        out = []
        for name, data, start, full in self.local_params():
            if data.numel() == 0:  # a rank can own no rows of a small tensor
                continue
            decay, group = info[name]
            out.append(Shard(name, data, start, full, block_id(name), decay, group))
        return out

    def blocks(self) -> list[tuple[str, int, str]]:
        """(name, full numel, layer group) of every parameter, empty local shards included: the same list
        on every rank, so samplers that index tensors (CurvZO, AdaLeZO) agree across ranks."""
        return [(name, full, self._param_info[name][1]) for name, _, _, full in self.local_params()]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _remember(self, model: nn.Module) -> None:
        """Record decay flags and layer groups from the unwrapped model (wrapping replaces parameters)."""
        self._param_info = param_info(model)
