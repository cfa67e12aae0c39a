"""launch/gpu_check.sh: a clear refusal without CUDA, and its measuring code run end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_refuses_clearly_without_cuda():
    proc = subprocess.run(["bash", "launch/gpu_check.sh"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dry_run_on_cpu_writes_the_report(tmp_path, dtype):
    pytest.importorskip("triton")
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY))
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "zofsdp.measure.gpu_check", "--cpu-dry-run", "--model-json", str(model),
           "--dtype", dtype, "--batch", "2", "--seq", "8", "--reps", "1", "--optimizers", "mezo,curvzo,uniform:0.1", "--warmup", "1", "--noise-numel", "4096",
           "--json", str(out), "--markdown", str(tmp_path / "gpu_check.md")]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["noise"]["z_max_abs_diff_vs_cpu_reference"] <= 1e-6
    if dtype == "float32":  # in place: one grouped launch per pass (+ε, −2ε, restore and update): all small
        assert result["step"]["launches_per_step"] == 3
    else:  # bf16 weights: each forward perturbs copies, the update writes the weights once
        assert result["step"]["probe"] == "swapped copies" and result["step"]["launches_per_step"] >= 3
    curvzo = result["step"]["optimizers"]["curvzo"]
    assert 0 < curvzo["keep_fraction"] <= 1 and curvzo["step_s"] > 0
    assert result["step"]["optimizers"]["uniform:0.1"]["keep_fraction"] < 0.5  # the arm's budget, not the default
    assert "step / forwards" in (tmp_path / "gpu_check.md").read_text()
