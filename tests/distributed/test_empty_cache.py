"""A fresh machine: every launch below starts from an empty model cache (its own ZOFSDP_CACHE), so the
ranks race to convert the checkpoint (the embedded SmolLM2 GGUF, or a tiny model's folder for DeepSpeed)
and whichever wins must publish a complete folder that the others then load.

With transformers 5.24 `save_pretrained` writes weights only on torch.distributed rank 0: a conversion won
by rank 1 used to publish a folder without weights, and rank 0 then died converting over it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, launch_env
from zofsdp.metrics import read_metrics
from zofsdp.models import missing_files

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SMALL = ["train.steps=2", "data.num_train=12", "data.num_dev=0", "data.num_eval=6", "train.eval_batch_size=6",
         "train.save_model=false", "zo.eps=1e-3"]


def run_fresh(tmp_path, launcher: list[str], args: list[str]) -> list[dict]:
    """Run with an empty cache; check the cache holds only complete folders; return the step records."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    env = launch_env() | {"ZOFSDP_CACHE": str(cache), "DS_ACCELERATOR": "cpu"}
    cmd = [*launcher, *args, f"train.output_dir={out}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    folders = [p for p in cache.rglob("config.json")]
    assert folders, f"nothing was converted into {cache}"
    leftovers = [p.name for p in cache.rglob("*.tmp*")]
    assert not leftovers, f"temporary folders left in the cache: {leftovers}"
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "projected_grad" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0.0 < r["loss"] < 20 for r in steps)
    return steps


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "zofsdp", "train"]


@pytest.mark.parametrize("nproc", [2, 3])
def test_smollm2_fsdp2_from_empty_cache(tmp_path, nproc):
    run_fresh(tmp_path, torchrun(nproc), ["model.name_or_path=smollm2-135m", "parallel.backend=fsdp2",
                                          f"train.batch_size={2 * nproc}"])
    (folder,) = [p.parent for p in (tmp_path / "cache").rglob("config.json")]
    assert missing_files(folder) == []


def test_tiny_deepspeed_from_empty_cache(tmp_path):
    run_fresh(tmp_path, torchrun(2), ["model.name_or_path=tiny-llama", "parallel.backend=deepspeed",
                                      "train.batch_size=4", "zo.eps=5e-2"])
    tiny = [p.parent for p in (tmp_path / "cache").rglob("config.json") if p.parent.parent.name == "tiny"]
    assert len(tiny) == 1 and missing_files(tiny[0], tokenizer=False) == []
