"""End to end on the real embedded model: a few FSDP2 steps of SmolLM2-135M on 2 ranks."""

import pytest

from tests.conftest import train_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_smollm2_fsdp2_smoke(tmp_path):
    steps = train_metrics(tmp_path, "smollm2-135m", "fsdp2", 2,
                          ["train.steps=2", "train.batch_size=4", "data.num_eval=8", "zo.eps=1e-3"])
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0.0 < r["loss"] < 20 and r["forward_passes"] == 2 * r["step"] for r in steps)
    assert steps[-1]["tokens"] > 0 and steps[-1]["wall_s"] > 0
