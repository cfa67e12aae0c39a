"""What every optimizer of issue 13 promises alike: its exact forwards per step, and no traffic of its own
(only the losses, which `loss_fn` all-reduces, cross ranks: any torch.distributed collective in a step fails)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.sparse_problems import Quadratic, zo_config
from zofsdp.config import ZOConfig
from zofsdp.optim import build_optimizer

FORWARDS = {"bszo": 3, "bszo_b": 4, "zo_adam": 2, "hizoo": 3}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "send", "recv", "isend", "irecv", "all_to_all", "barrier")


@pytest.mark.parametrize("name", list(FORWARDS))
def test_forwards_per_step_and_no_collectives(name, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} called a collective")

    for fn in COLLECTIVES:
        monkeypatch.setattr(torch.distributed, fn, forbidden, raising=False)
    problem = Quadratic([300, 200], [1.0, 2.0], dtype=torch.float32)
    cfg: ZOConfig = zo_config(optimizer=name, lr=1e-3)
    opt = build_optimizer(cfg, problem.shards, seed=0)
    start = problem.flat()
    for step in range(1, 4):
        calls = []

        def loss(calls=calls) -> float:
            calls.append(1)
            return problem.loss()

        record = opt.step(loss, step)
        assert len(calls) == record["forward_passes"] == FORWARDS[name]
    assert not torch.equal(problem.flat(), start)
