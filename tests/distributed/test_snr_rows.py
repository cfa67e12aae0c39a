"""CurvZO score=snr_rows through the real trainer: each row's loss reaches every rank through the all-reduce
(2-rank FSDP2 takes the steps one process takes, keep fractions included), and `zofsdp replay` rebuilds the
weights from the seed log alone, where the two per-example statistics of every probe are logged."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_RUN, assert_same_trajectory, run_cli
from zofsdp.checkpoint import ROOT as CKPT
from zofsdp.checkpoint import full_tensors
from zofsdp.metrics import read_metrics

pytestmark = pytest.mark.distributed

STEPS = 8
RUN = [*[a for a in TINY_RUN if not a.startswith("train.steps=")], f"train.steps={STEPS}",
       f"train.checkpoint_every={STEPS}", "model.name_or_path=tiny-llama", "zo.optimizer=curvzo",
       "zo.curvzo.score=snr_rows", "zo.curvzo.weight_power=0"]


def steps(out) -> list[dict]:
    return [m for m in read_metrics(out / "metrics.jsonl") if "projected_grad" in m]


def test_two_ranks_take_the_one_process_steps_and_replay_is_bitwise(tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(["train", *RUN, "parallel.backend=none", f"train.output_dir={one}"])
    run_cli(["train", *RUN, "parallel.backend=fsdp2", f"train.output_dir={two}"], nproc=2)
    a, b = steps(one), steps(two)
    assert_same_trajectory(a, b, keys=("loss", "projected_grad", "keep_fraction"))
    assert len({round(m["keep_fraction"], 6) for m in a}) > 1  # π moved once the 4 units were observed
    run_cli(["replay", "--base", "tiny-llama", "--run", str(one), "--out", str(tmp_path / "replayed")])
    trained = full_tensors(one / CKPT / f"step_{STEPS:08d}")
    rebuilt = load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
