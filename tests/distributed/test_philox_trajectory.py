"""`zo.noise=philox` through FSDP2 at 1, 2 and 3 ranks (uneven shards) gives the one-process trajectory."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import assert_same_trajectory, train_metrics

pytestmark = pytest.mark.distributed


def test_philox_fsdp2_matches_one_process_at_1_2_3_ranks(tmp_path):
    extra = ["zo.noise=philox", "train.steps=3"]
    reference = train_metrics(tmp_path, "tiny-llama", "none", 0, extra)
    saved = yaml.safe_load((tmp_path / "tiny-llama-none-0" / "config.yaml").read_text())
    assert saved["zo"]["noise"] == "philox"  # the runs below really use philox (unit tests: its z differs)
    for nproc in (1, 2, 3):
        assert_same_trajectory(reference, train_metrics(tmp_path, "tiny-llama", "fsdp2", nproc, extra))
