"""The bad-input matrix (docs/errors.md): every user mistake ends with one line that names it, exit 2.

Each case runs the real CLI in-process (`zofsdp.cli.main`) on the tiny model and checks that stderr ends
with exactly one `zofsdp: error: ...` line that contains the expected words, and holds no traceback.
"""

from __future__ import annotations

import errno
import logging
import pathlib
import shutil
from pathlib import Path

import pytest

from zofsdp.cli import main

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TINY = ["model.name_or_path=tiny-llama", "train.steps=1", "train.batch_size=2", "data.num_train=4",
        "data.num_dev=0", "data.num_eval=2", "train.save_model=false"]


@pytest.fixture(autouse=True)
def _drop_log_handlers():
    """setup_logging binds a handler to this test's captured stderr; the next test must not write to it."""
    yield
    logging.getLogger().handlers.clear()


def run(capsys, tmp_path, *args: str) -> str:
    """The CLI's exit code must be 2 and its last stderr line the one error line; returns that line."""
    code = main(["train", *TINY, f"train.output_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("zofsdp: error")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    return lines[0]


def tiny_folder(path: Path) -> Path:
    from zofsdp.config import ModelConfig
    from zofsdp.models import load_model, load_tokenizer, write_hf_folder

    tokenizer = load_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    model = load_model(ModelConfig(name_or_path="tiny-llama"), len(tokenizer))
    write_hf_folder(path, model, model.state_dict(), tokenizer)
    return path


def data_dir(tmp_path: Path, train_text: str | None = None, task: str = "sst2") -> Path:
    """A copy of the task's folder with its train file replaced by `train_text`."""
    root = tmp_path / "data"
    shutil.copytree(SHARED_DATA / task, root / task)
    if train_text is not None:
        name = "glue_train_full.tsv" if task == "sst2" else "train.jsonl"
        (root / task / name).write_text(train_text)
    return root


def test_unknown_key(capsys, tmp_path):
    assert "unknown config key 'zo.learning_rate'" in run(capsys, tmp_path, "zo.learning_rate=1e-5")


def test_wrong_type(capsys, tmp_path):
    assert "train.steps: expected int" in run(capsys, tmp_path, "train.steps=many")


def test_missing_config_file(capsys, tmp_path):
    assert "config file not found" in run(capsys, tmp_path, "-c", str(tmp_path / "nope.yaml"))


def test_missing_model_folder(capsys, tmp_path):
    assert "folder not found" in run(capsys, tmp_path, f"model.name_or_path={tmp_path / 'no-model'}")


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes").mkdir()
    assert "has no config.json" in run(capsys, tmp_path, f"model.name_or_path={tmp_path / 'notes'}")


def test_corrupt_config_json(capsys, tmp_path):
    folder = tiny_folder(tmp_path / "model")
    (folder / "config.json").write_text("{ not json")
    assert "cannot load the model" in run(capsys, tmp_path, f"model.name_or_path={folder}")


def test_corrupt_safetensors(capsys, tmp_path):
    folder = tiny_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    assert "cannot load the model" in run(capsys, tmp_path, f"model.name_or_path={folder}")


def test_unknown_task(capsys, tmp_path):
    assert "unknown task 'sst3'; known: cb, rte, sst2" in run(capsys, tmp_path, "data.task=sst3")


def test_missing_data_dir(capsys, tmp_path):
    assert "data.dir not found" in run(capsys, tmp_path, f"data.dir={tmp_path / 'nodata'}")


def test_empty_data_file(capsys, tmp_path):
    line = run(capsys, tmp_path, f"data.dir={data_dir(tmp_path, '')}")
    assert "sst2" in line and ("cannot parse" in line or "no training examples" in line)


def test_malformed_data_file(capsys, tmp_path):
    bad = '{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{this is not json\n'
    line = run(capsys, tmp_path, "data.task=rte", f"data.dir={data_dir(tmp_path, bad, task='rte')}")
    assert "rte: cannot parse" in line


def test_missing_label_column(capsys, tmp_path):
    folder = data_dir(tmp_path, "sentence\nit was fine\n")
    line = run(capsys, tmp_path, f"data.dir={folder}")
    assert "lacks columns ['label']" in line


def test_unwritable_output_folder(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    line = run(capsys, tmp_path, f"train.output_dir={tmp_path / 'a-file' / 'run'}")
    assert "cannot write there" in line


def test_full_disk_is_caught_before_loading(capsys, tmp_path, monkeypatch):
    original = pathlib.Path.write_bytes

    def full(self, data):
        if self.name.startswith(".write-test"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    assert "No space left on device" in run(capsys, tmp_path)


def test_full_disk_during_a_run(capsys, tmp_path, monkeypatch):
    def train(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setattr("zofsdp.train.train", train)
    assert "No space left on device: runs/x/metrics.jsonl" in run(capsys, tmp_path)


def test_finished_run_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    assert "already holds a finished run" in run(capsys, tmp_path)


def test_nan_losses_stop_the_run(capsys, tmp_path):
    line = run(capsys, tmp_path, "zo.eps=1e38", "train.steps=6")  # θ ± εz overflows: every loss is NaN
    assert "5 steps in a row gave non-finite losses" in line


@pytest.mark.distributed
def test_batch_smaller_than_world_size_under_torchrun(tmp_path):
    """Under torchrun too: each rank prints the one line (no `[rank0]: Traceback`) and exits 2."""
    import subprocess
    import sys

    from tests.conftest import ROOT, launch_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "zofsdp", "train", *TINY, "parallel.backend=fsdp2", "train.batch_size=1",
           f"train.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    tracebacks = [f"[rank{r}]: Traceback" for r in (0, 1) if f"[rank{r}]: Traceback" in proc.stderr]
    assert not tracebacks, proc.stderr[-3000:]
    for rank in (0, 1):
        assert (f"zofsdp: error (rank {rank}): train.batch_size=1 is smaller than the world size 2"
                in proc.stderr), proc.stderr[-3000:]
