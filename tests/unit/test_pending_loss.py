"""Losses stay on the device until used: two-probe optimizers queue both forwards before reading either
(issue 11: on a GPU one host sync per step instead of one per forward), and nothing else changes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_mezo import vector_shards
from zofsdp.config import ZOConfig
from zofsdp.optim import build_optimizer
from zofsdp.scoring import PendingLoss, as_floats


class LoggedTotals:
    """Stands in for the all-reduced [loss sum, correct] tensor; logs when the loss is read back."""

    def __init__(self, value: float, events: list, name: str):
        self.value, self.events, self.name = value, events, name

    def __getitem__(self, index):
        return self

    def item(self) -> float:
        self.events.append(f"read {self.name}")
        return self.value


def test_pending_loss_reads_once_and_acts_as_its_float():
    events = []
    loss = PendingLoss(LoggedTotals(6.0, events, "a"), rows=4)
    assert events == []  # nothing read at creation
    assert loss - 1 == 0.5 and 2 * loss == 3.0 and loss / 3 == 0.5 and 3 - loss == 1.5 and -loss == -1.5
    assert loss > 1 and loss <= 1.5 and loss == 1.5 and math.isfinite(loss) and f"{loss:.2f}" == "1.50"
    assert events == ["read a"]  # one read, however often it is used
    assert as_floats({"loss": loss, "steps": 3}) == {"loss": 1.5, "steps": 3}
    with pytest.raises(TypeError):
        hash(loss)


@pytest.mark.parametrize("name", ["mezo", "curvzo", "adalezo", "zo_adam"])
def test_two_probe_optimizers_queue_both_forwards_before_reading(name):
    theta = torch.randn(3000)
    cfg = ZOConfig(optimizer=name, lr=1e-3, eps=1e-2, chunk_numel=1024)
    opt = build_optimizer(cfg, vector_shards(theta), 0)
    for step in (1, 2, 3):
        events, count = [], [0]

        def loss_fn():
            count[0] += 1
            events.append(f"forward {count[0]}")
            return PendingLoss(LoggedTotals(float(theta.double().square().sum()), events, str(count[0])), 1)

        record = as_floats(opt.step(loss_fn, step))
        forwards = [i for i, e in enumerate(events) if e.startswith("forward")]
        reads = [i for i, e in enumerate(events) if e.startswith("read")]
        assert len(forwards) == record["forward_passes"] == 2, events
        assert reads and min(reads) > max(forwards), f"{name} read a loss before both probes: {events}"
        assert isinstance(record["loss"], float) and isinstance(record["projected_grad"], float)


def test_pending_losses_give_the_same_step_as_floats():
    """The optimizer sees the same numbers either way: weights bitwise equal after a few steps."""
    out = []
    for pending in (False, True):
        theta = torch.linspace(-1, 1, 2048)
        opt = build_optimizer(ZOConfig(optimizer="mezo", lr=1e-2, eps=1e-2, chunk_numel=1024),
                              vector_shards(theta), 0)
        for step in range(1, 4):
            def loss_fn():
                value = float(theta.double().square().sum())
                return PendingLoss(torch.tensor([value, 0.0], dtype=torch.float64), 1) if pending else value

            opt.step(loss_fn, step)
        out.append(theta.clone())
    assert torch.equal(out[0], out[1])


def test_per_example_losses_come_with_the_mean_in_one_read():
    """train.enqueue_loss with `at` appends each row's loss; PendingLoss gives them as `per_example`."""
    loss = PendingLoss(torch.tensor([6.0, 1.0, 1.0, 2.0, 3.0], dtype=torch.float64), rows=3, per_example=True)
    assert loss.per_example == [1.0, 2.0, 3.0] and float(loss) == 2.0
    plain = PendingLoss(torch.tensor([6.0, 1.0], dtype=torch.float64), rows=3)
    assert plain.per_example is None and float(plain) == 2.0
