"""One process, no sharding (MeZO's setting): every parameter is a single shard starting at 0."""

from __future__ import annotations

import torch
from torch import nn

from zofsdp.optim.probe import Probe
from zofsdp.parallel.base import Backend
from zofsdp.parallel.precision import autocast_forward, dtypes, gathered_probes, probe_by_swapping


class NoneBackend(Backend):
    name = "none"

    probe: Probe | None = None
    """Set when probes go to copies (bf16/fp16 weights, mixed): the optimizer's probes reach only the forwards."""
    gathered = False
    """model.perturb resolved (zofsdp.config.perturbs_gathered); bf16/fp16 weights always use the probe."""

    def __init__(self, cfg=None) -> None:
        self.store_dtype, self.compute_dtype = dtypes(cfg)
        self.gathered = gathered_probes(cfg)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        self._remember(model)
        self.model = model.to(self.device)
        self.apply_precision(self.model)
        return self.model

    def apply_precision(self, model: nn.Module) -> None:
        """Mixed: fp32 weights, the forward under autocast. bf16/fp16 weights and mixed (model.perturb=auto):
        probes swap in a perturbed copy during each module's forward (zofsdp.parallel.precision), so the
        weights are never perturbed; one tensor's copy is alive at a time."""
        if self.compute_dtype != self.store_dtype:
            autocast_forward(model, self.compute_dtype, self.device)
        if self.gathered or self.store_dtype != torch.float32:
            self.probe = Probe()
            probe_by_swapping(model, self.probe)

    def local_params(self):
        return [(n, p.data.view(-1), 0, p.numel()) for n, p in self.model.named_parameters()]

    def close(self) -> None:
        pass
