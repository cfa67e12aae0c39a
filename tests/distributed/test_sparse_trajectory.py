"""CurvZO and AdaLeZO draw the same masks/arms and give the same trajectory on every layout.

Masks come from (seed, step) and the block table from the backend's full parameter list, scores from the
all-reduced losses: so `none` (1 process) and FSDP2 on 2 and 3 ranks (uneven shards) must agree.
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_trajectory, train_metrics

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("optimizer", ["curvzo", "adalezo"])
def test_same_trajectory_none_fsdp2_2_and_3_ranks(tmp_path, optimizer):
    extra = [f"zo.optimizer={optimizer}"]
    reference = train_metrics(tmp_path, "tiny-llama", "none", 0, extra)
    assert 0 < min(m["keep_fraction"] for m in reference) < 1  # really sparse, and the masks vary
    assert len({m["keep_fraction"] for m in reference}) > 1
    for nproc in (2, 3):
        other = train_metrics(tmp_path, "tiny-llama", "fsdp2", nproc, extra)
        assert_same_trajectory(reference, other)
        assert [m["keep_fraction"] for m in other] == [m["keep_fraction"] for m in reference]
