"""PyTorch FSDP2 (`fully_shard`): each decoder layer, then the root, sharded on dim 0 over all ranks."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from zofsdp.models import decoder_layers
from zofsdp.optim.probe import Probe
from zofsdp.parallel.base import Backend, init_distributed
from zofsdp.parallel.precision import dtypes, gathered_probes, probe_fsdp2_units


class FSDP2Backend(Backend):
    name = "fsdp2"

    probe: Probe | None = None
    """Set when probes go to the gathered parameters (bf16/fp16 shards, mixed; model.perturb)."""
    gathered = False
    """model.perturb resolved (zofsdp.config.perturbs_gathered); bf16/fp16 shards always use the probe."""

    def __init__(self, cfg=None) -> None:
        self.store_dtype, self.compute_dtype = dtypes(cfg)
        self.gathered = gathered_probes(cfg)
        timeout = cfg.parallel.timeout_minutes if cfg is not None else 60.0
        self.rank, self.world_size, self.device = init_distributed(timeout)

    def load_model(self, cfg, vocab_size: int) -> nn.Module:
        """Lean loading (zofsdp.loading): built on meta, sharded, then each rank reads its own rows; no rank
        holds the whole model. The returned model is already wrapped (`wrap` passes it through)."""
        from zofsdp.loading import load_lean

        return self._measure_load(lambda: load_lean(cfg, vocab_size, self.wrap, self.device))

    def wrap(self, model: nn.Module) -> nn.Module:
        if isinstance(model, FSDPModule):  # sharded while loading (load_model)
            return model
        self._remember(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # Mixed precision: the shards stay fp32 (updates), each is cast to the compute dtype before its
        # all-gather, so traffic and gathered copies are those of a bf16 model.
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
        # The root (embeddings, final norm, lm head) must reshard too: left unsharded after a forward,
        # edits to its shards would be silently ignored by the next forward.
        fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
        if self.gathered or self.store_dtype != torch.float32:  # probes go to the gathered copies
            self.probe = Probe()
            probe_fsdp2_units(model, layers, self.probe)
        self.model = model
        return model

    @torch.no_grad()  # in-place edits of a DTensor's local view are only legal without autograd
    def local_params(self):
        out = []
        for name, p in self.model.named_parameters():
            local = p.to_local()
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            # Shard(0): the local rows are one contiguous run of the flattened tensor.
            start = offset[0] * math.prod(p.shape[1:]) if local.numel() else 0
            out.append((name, local.view(-1), start, p.numel()))
        return out
