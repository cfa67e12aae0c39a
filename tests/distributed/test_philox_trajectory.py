"""`zo.noise=philox` through FSDP2 at 1, 2 and 3 ranks (uneven shards) gives the one-process trajectory."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_trajectory, train_metrics

pytestmark = pytest.mark.distributed


def test_philox_fsdp2_matches_one_process_at_1_2_3_ranks(tmp_path):
    extra = ["zo.noise=philox", "train.steps=3"]
    reference = train_metrics(tmp_path, "tiny-llama", "none", 0, extra)
    gaussian = train_metrics(tmp_path / "gaussian", "tiny-llama", "none", 0, ["train.steps=3"])
    assert reference[0]["projected_grad"] != gaussian[0]["projected_grad"]  # philox really ran
    for nproc in (1, 2, 3):
        assert_same_trajectory(reference, train_metrics(tmp_path, "tiny-llama", "fsdp2", nproc, extra))
