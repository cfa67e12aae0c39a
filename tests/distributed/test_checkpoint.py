"""Checkpoints across layouts (issue 12): saved by 2-rank FSDP2, resumed by 3-rank FSDP2, one process and
2-rank DeepSpeed; a rank killed with SIGKILL under torchrun --max-restarts 1; SIGTERM on one process; and
`zofsdp replay` from the seed log. Every resumed run is compared with the uninterrupted one.

Runs are shared between tests (a torchrun launch costs ~15-20 s of imports). CurvZO, not MeZO: its block
scores and budget must come back from the checkpoint exactly, or the masks of later steps differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import ROOT, TINY_RUN, assert_same_trajectory, launch_env, run_cli
from zofsdp.checkpoint import ROOT as CKPT
from zofsdp.checkpoint import full_tensors
from zofsdp.metrics import read_metrics

pytestmark = pytest.mark.distributed

STEPS = 10
RUN = [*[a for a in TINY_RUN if not a.startswith("train.steps=")], f"train.steps={STEPS}",
       "train.checkpoint_every=3", "train.keep_checkpoints=5", "model.name_or_path=tiny-llama",
       "zo.optimizer=curvzo"]
FIRST = f"{CKPT}/step_00000003"
# (backend, processes) of every run; "resume" runs start from the 2-rank FSDP2 run's step-3 checkpoint.
RUNS = {"fsdp2-2": ("fsdp2", 2), "none": ("none", 0), "fsdp2-3-resumed": ("fsdp2", 3),
        "none-resumed": ("none", 0), "deepspeed-2-resumed": ("deepspeed", 2)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    done: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in done:
            backend, nproc = RUNS[key]
            out = root / key
            extra = [f"train.resume={get('fsdp2-2') / FIRST}"] if key.endswith("resumed") else []
            run_cli(["train", *RUN, f"parallel.backend={backend}", f"train.output_dir={out}", *extra], nproc=nproc)
            done[key] = out
        return done[key]

    get.root = root
    return get


def steps(out: Path, first: int = 1) -> list[dict]:
    return [m for m in read_metrics(out / "metrics.jsonl") if "projected_grad" in m and m["step"] >= first]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return full_tensors(out / CKPT / f"step_{STEPS:08d}")


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two fp32 tensors of the same sign pattern."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def compare(reference: Path, resumed: Path) -> dict:
    """Max relative difference of loss/projected_grad over steps 4..10 and bitwise equality of the weights."""
    a, b = steps(reference, 4), steps(resumed, 4)
    assert [r["step"] for r in b] == list(range(4, STEPS + 1))
    assert_same_trajectory(a, b)
    rel = max(abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), 1e-12) for x, y in zip(a, b)
              for k in ("loss", "projected_grad"))
    wa, wb = final_weights(reference), final_weights(resumed)
    assert wa.keys() == wb.keys()
    worst = max(ulps(wa[k], wb[k]) for k in wa)
    print(f"\n{resumed.name}: max relative difference {rel:.2e}, weights max {worst} ulp", file=sys.stderr)
    return {"rel": rel, "ulps": worst}


def test_resume_on_three_fsdp2_ranks_equals_the_uninterrupted_run(run):
    assert compare(run("fsdp2-2"), run("fsdp2-3-resumed"))["ulps"] == 0


def test_resume_on_one_process_equals_the_uninterrupted_run(run):
    assert compare(run("fsdp2-2"), run("none-resumed"))["ulps"] == 0


def test_resume_on_two_deepspeed_ranks_equals_the_uninterrupted_run(run):
    assert compare(run("fsdp2-2"), run("deepspeed-2-resumed"))["ulps"] == 0


def test_checkpoints_are_complete_and_pruned(run):
    out = run("fsdp2-2")
    names = sorted(p.name for p in (out / CKPT).iterdir())
    assert names == [f"step_{s:08d}" for s in (3, 6, 9, 10)]  # nothing partial left behind
    manifest = json.loads((out / FIRST / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["data"]["batches_drawn"] == 3
    assert [f["name"] for f in manifest["files"]] == [f"shards-{r:05d}-of-00002.safetensors" for r in (0, 1)]
    assert json.loads((out / FIRST / "optimizer.json").read_text())["optimizer"] == "curvzo"


def test_another_model_is_refused(run, tmp_path):
    with pytest.raises(AssertionError, match="holds another model: model.embed_tokens.weight is missing here"):
        run_cli(["train", *RUN, "model.name_or_path=tiny-opt", f"train.output_dir={tmp_path}",
                 f"train.resume={run('fsdp2-2') / FIRST}"])


# ---------------------------------------------------------------------------------- signals and kills


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the test could act:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def start(args: list[str], nproc: int = 0, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zofsdp", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={restarts}", "-m", "zofsdp", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def stop_all(proc: subprocess.Popen) -> None:
    """Kill the launcher and every process it started (the test's own tree only)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "zofsdp" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"rank {rank} not found among the launcher's children")


def test_killed_rank_restarts_and_resumes_to_the_same_model(run):
    """SIGKILL of rank 1 after the first checkpoint: torchrun restarts the group, which resumes on its own."""
    reference = final_weights(run("fsdp2-2"))
    out = run.root / "killed"
    proc = start(["train", *RUN, "parallel.backend=fsdp2", f"train.output_dir={out}", "train.resume=auto"],
                 nproc=2, restarts=1)
    try:
        wait_for(lambda: (out / FIRST / "manifest.json").is_file(), proc)
        os.kill(rank_pid(proc, 1), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=400)
    finally:
        stop_all(proc)
    assert proc.returncode == 0, stderr[-4000:]
    assert "resumed from" in stderr, "the group did not restart from a checkpoint"
    weights = final_weights(out)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert [r["step"] for r in steps(out)] == list(range(1, STEPS + 1))  # the crashed attempt's lines went


def test_sigterm_checkpoints_then_resume_auto_finishes_the_same_run(run):
    out = run.root / "sigterm"
    args = ["train", *RUN, "parallel.backend=none", f"train.output_dir={out}", "train.resume=auto"]
    proc = start(args)
    try:
        wait_for(lambda: len(steps(out) if (out / "metrics.jsonl").is_file() else []) >= 1, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        stop_all(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = max(r["step"] for r in steps(out))
    assert stopped < STEPS and (out / CKPT / f"step_{stopped:08d}" / "manifest.json").is_file()
    run_cli(args)
    weights, reference = final_weights(out), final_weights(run("none"))
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


# ---------------------------------------------------------------------------------------------- replay


def replayed(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    run_cli(["replay", "--base", "tiny-llama", "--run", str(run_dir), "--out", str(out)])
    return load_file(out / "model.safetensors")


def test_replay_on_one_process_is_bitwise(run, tmp_path):
    trained, rebuilt = final_weights(run("none")), replayed(run("none"), tmp_path / "replayed")
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)


def test_replay_of_a_two_rank_run_is_within_one_ulp(run, tmp_path):
    trained, rebuilt = final_weights(run("fsdp2-2")), replayed(run("fsdp2-2"), tmp_path / "replayed")
    worst = max(ulps(trained[k], rebuilt[k]) for k in trained)
    size = (run("fsdp2-2") / "seedlog.bin").stat().st_size
    print(f"\nreplay of fsdp2-2: max {worst} ulp; seedlog.bin {size} bytes for {STEPS} steps", file=sys.stderr)
    assert worst <= 1


@pytest.mark.parametrize("optimizer", ["mezo", "bszo"])
def test_a_stateless_or_small_state_optimizer_resumes_on_one_process(tmp_path, optimizer):
    """MeZO keeps no state (its checkpoint's optimizer.json is empty): resuming it must not trip the refusal
    of another optimizer's state (a bug the CurvZO runs above could not catch)."""
    args = ["train", *RUN[:-1], f"zo.optimizer={optimizer}", "train.steps=4", "train.checkpoint_every=2",
            "parallel.backend=none"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_cli([*args, f"train.output_dir={whole}"])
    run_cli([*args, f"train.output_dir={resumed}", f"train.resume={whole / CKPT / 'step_00000002'}"])
    assert_same_trajectory(steps(whole, 3), steps(resumed, 3))
    a, b = full_tensors(whole / CKPT / "step_00000004"), full_tensors(resumed / CKPT / "step_00000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
