"""A command leaves nothing for interpreter shutdown: its sharded model and process group are freed
before `main` returns (otherwise gloo's threads may be torn down during finalisation: SIGABRT)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, launch_env

PROBE = """
import gc, sys
gc.disable()  # the collector must not run by chance: only what main() frees itself counts
from torch.distributed.fsdp import FSDPModule
import torch.distributed as dist
from zofsdp.cli import main
code = main(["train", "model.name_or_path=tiny-llama", "parallel.backend=fsdp2", "train.steps=1",
             "train.batch_size=2", "data.num_train=4", "data.num_dev=0", "data.num_eval=2",
             "train.save_model=false", "train.output_dir=" + sys.argv[1]])
alive = sum(isinstance(o, FSDPModule) for o in gc.get_objects())
print(f"exit={code} fsdp_modules_alive={alive} group_alive={dist.is_initialized()}")
"""


def test_train_frees_its_sharded_model_and_group_before_returning(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run")], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exit=0 fsdp_modules_alive=0 group_alive=False" in proc.stdout, proc.stdout + proc.stderr[-2000:]
