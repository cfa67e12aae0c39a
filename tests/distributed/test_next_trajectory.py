"""BSZO, BSZO-B, ZO-Adam, HiZOO and LOREN give the same trajectory on `none`, FSDP2 (2 and 3 ranks, uneven
shards) and DeepSpeed ZeRO-3 (flat partitions that cut rows, the last one padded).

BSZO's posterior is computed from the all-reduced losses on every rank; ZO-Adam's moments and HiZOO's
diagonal Hessian are sharded like the parameters;
LOREN's column sums are all-reduced once per step; DiZO's anchor is sharded like the parameters, its distances
all-reduced once per projection, and its search batches drawn by the trainer from (seed, step, k). Launches are the cost here (20-60 s each on 2 cores):
one reference per optimizer, and the layouts spread over the optimizers (each layout was also run with
every optimizer once, when they were written: docs/optimizers.md).
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_trajectory, train_metrics

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "bszo": [("fsdp2", 3)],
    "bszo_b": [("deepspeed", 2)],
    "zo_adam": [("deepspeed", 3)],
    "hizoo": [("fsdp2", 2)],
    "loren": [("deepspeed", 2)],  # its one all-reduce of column sums over partitions that cut rows
    "dizo": [("fsdp2", 3), ("deepspeed", 2)],
}
EXTRA = {"dizo": ["zo.dizo.interval=2", "zo.dizo.search_iters=3"]}
"""Projections after steps 2 and 4 of the 5 (8 forwards each), so that they are part of the trajectory."""


@pytest.mark.parametrize("optimizer", list(LAYOUTS))
def test_same_trajectory_none_fsdp2_deepspeed(tmp_path, optimizer):
    extra = [f"zo.optimizer={optimizer}", *EXTRA.get(optimizer, [])]
    reference = train_metrics(tmp_path, "tiny-llama", "none", 0, extra)
    assert len({m["loss"] for m in reference}) > 1  # the weights move
    if optimizer == "dizo":
        assert [m["forward_passes"] for m in reference] == [2, 10, 12, 20, 22]
        keys = ("loss", "projected_grad", "projection_distance", "projection_ratio")
        projections = [m for m in reference if "projection_distance" in m]
        assert len(projections) == 2
    for backend, nproc in LAYOUTS[optimizer]:
        other = train_metrics(tmp_path, "tiny-llama", backend, nproc, extra)
        assert_same_trajectory(reference, other)
        if optimizer == "dizo":
            assert_same_trajectory(projections, [m for m in other if "projection_distance" in m], keys=keys)
