"""The one small interface between the ZO optimizers and how the model is laid out across ranks.

Optimizers see only `shards()` (flat, editable views of what this rank owns, each with its global offset)
and `all_reduce_sum` for scalars. They never import FSDP or DeepSpeed.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from torch import nn

from zofsdp.models import param_info
from zofsdp.noise import Shard, block_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, for a lone `python` run, create) the process group; returns rank, world size, device."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # started by plain python: a one-rank group
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


class Backend(ABC):
    """How parameters are laid out over ranks, and the scalar all-reduce."""

    name: str
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def load_model(self, cfg, vocab_size: int) -> nn.Module:
        """Build the model on this rank (DeepSpeed overrides this to load straight into partitions)."""
        from zofsdp.models import load_model

        return load_model(cfg, vocab_size, device="cpu")

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard (or not) the model; returns the module to call for forwards."""

    @abstractmethod
    def local_params(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """(name, flat local view, global flat start, full numel) per parameter tensor, in model order."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The consolidated fp state dict on rank 0 (None elsewhere); a collective."""

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
