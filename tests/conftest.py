"""Shared fixtures: run the real CLI (in-process or under torchrun) on tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zofsdp.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

# Small and fast: a 2-layer hidden-64 model, 48 training rows, eps large enough that the finite
# difference is not dominated by fp32 rounding (projected_grad is compared across layouts: at 1e-2 the
# fp32 noise of the forward reached 1e-5 relative; 5e-2 leaves a 5x margin).
TINY_RUN = [
    "train.steps=5", "train.batch_size=12", "data.num_train=48", "data.num_dev=0", "data.num_eval=24",
    "train.save_model=false", "zo.eps=5e-2", "zo.lr=1e-3", "train.eval_batch_size=24",
]


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], nproc: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m zofsdp ARGS` (nproc=0) or under torchrun with nproc processes; raises with the log."""
    if nproc == 0:
        cmd = [sys.executable, "-m", "zofsdp", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "zofsdp", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_metrics(tmp: Path, model: str, backend: str, nproc: int, extra: list[str] = ()) -> list[dict]:
    """Per-step records of a tiny training run."""
    out = tmp / f"{model}-{backend}-{nproc}"
    run_cli(["train", f"model.name_or_path={model}", f"parallel.backend={backend}",
             f"train.output_dir={out}", *TINY_RUN, *extra], nproc=nproc)
    return [m for m in read_metrics(out / "metrics.jsonl") if "projected_grad" in m]


def assert_same_trajectory(a: list[dict], b: list[dict], rtol: float = 1e-5, keys=("loss", "projected_grad")):
    assert len(a) == len(b) and a, (len(a), len(b))
    for ra, rb in zip(a, b):
        for key in keys:
            x, y = ra[key], rb[key]
            assert abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12), (ra["step"], key, x, y)


@pytest.fixture(scope="session", autouse=True)
def fresh_model_cache(tmp_path_factory):
    """The whole suite converts into its own empty cache (ZOFSDP_CACHE, inherited by every launched
    process), so it passes on a fresh machine and never depends on what an earlier run left in ~/.cache."""
    cache = tmp_path_factory.mktemp("zofsdp-cache")
    old = os.environ.get("ZOFSDP_CACHE")
    os.environ["ZOFSDP_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("ZOFSDP_CACHE", None)
    else:
        os.environ["ZOFSDP_CACHE"] = old


@pytest.fixture(scope="session")
def tokenizer():
    from zofsdp.config import ModelConfig
    from zofsdp.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="tiny-llama"))
