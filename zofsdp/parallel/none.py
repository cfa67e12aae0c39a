"""One process, no sharding (MeZO's setting): every parameter is a single shard starting at 0."""

from __future__ import annotations

import torch
from torch import nn

from zofsdp.parallel.base import Backend


class NoneBackend(Backend):
    name = "none"

    def __init__(self) -> None:
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        self._remember(model)
        self.model = model.to(self.device)
        return self.model

    def local_params(self):
        return [(n, p.data.view(-1), 0, p.numel()) for n, p in self.model.named_parameters()]

    def full_state_dict(self):
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def close(self) -> None:
        pass
