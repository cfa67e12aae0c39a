"""Every launch script runs with config overrides on either side of `-c`, as the README shows them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, launch_env
from zofsdp.metrics import read_metrics

pytestmark = pytest.mark.distributed

QUICK = ["train.steps=2", "data.num_train=16", "data.num_eval=4", "train.eval_batch_size=4",
         "train.save_model=false"]


def launch(script: str, args: list[str], timeout: int = 900) -> str:
    env = launch_env() | {"PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    cmd = ["bash", str(ROOT / "launch" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


def steps_of(out) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "projected_grad" in r]


@pytest.mark.parametrize(("script", "config"), [("torchrun.sh", "configs/tiny_llama.yaml"),
                                               ("deepspeed.sh", "configs/deepspeed_tiny.yaml")])
def test_launcher_takes_overrides_before_and_after_the_config(tmp_path, script, config):
    out = tmp_path / "run"
    backend = ["parallel.backend=fsdp2"] if script == "torchrun.sh" else []  # deepspeed.sh sets its own
    launch(script, ["2", "train", "train.batch_size=4", *backend, "-c", config, *QUICK,
                    f"train.output_dir={out}"])
    assert steps_of(out) == [1, 2]


@pytest.mark.slow
def test_quickstart_with_overrides_prints_accuracy_before_and_after(tmp_path):
    out = tmp_path / "quick"
    stdout = launch("quickstart.sh", [*QUICK, "train.batch_size=4", "train.eval_every=0",
                                      f"train.output_dir={out}"])
    assert steps_of(out) == [1, 2]
    assert "SST-2 accuracy:" in stdout and "after 2 MeZO steps" in stdout, stdout[-2000:]
