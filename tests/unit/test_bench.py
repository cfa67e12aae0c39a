"""`zofsdp bench --quick`: the JSON has the promised structure and every ratio is finite and positive.

No timing thresholds here: speed is measured by the benchmark itself (docs/performance.md).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import run_cli
from zofsdp.measure.bench import REFERENCE, ReferenceMeZO
from zofsdp.measure.dist import CommCounter
from zofsdp.optim import OPTIMIZERS


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def run_bench(tmp_path, *sections: str) -> dict:
    out = tmp_path / "bench.json"
    run_cli(["bench", "--quick", "--reps", "1", "--steps", "2", "--json", str(out), "--plot", str(tmp_path),
             "--out", str(tmp_path / "runs"), "--sections", *sections], timeout=1200)
    return json.loads(out.read_text())


def test_quick_bench_in_one_process(tmp_path):
    result = run_bench(tmp_path, "overhead", "noise", "convergence")
    overhead = result["step_overhead"]
    assert REFERENCE in overhead and "mezo" in overhead
    assert set(OPTIMIZERS) <= set(overhead) | set(result["step_overhead_detail"]["errors"])
    assert all(finite_positive(r) for r in overhead.values()), overhead
    rates = result["noise_elements_per_s"]
    assert {"copy", "randn_add", "ours_gaussian", "ours_table"} <= set(rates)
    assert all(finite_positive(r) for r in rates.values()), rates
    runs = result["convergence"]["runs"]
    assert "mezo" in runs and runs["mezo"]["points"]
    for run in runs.values():
        passes = [p["forward_passes"] for p in run["points"]]
        assert passes == sorted(passes) and passes[0] == 0
    assert (tmp_path / "bench_convergence.png").is_file() and (tmp_path / "bench_overhead.png").is_file()


@pytest.mark.distributed
def test_quick_bench_comm_and_scaling(tmp_path):
    result = run_bench(tmp_path, "comm", "scaling")
    fsdp2 = result["comm_bytes_per_step"]["fsdp2"]
    for name in OPTIMIZERS:
        assert "error" not in fsdp2[name], fsdp2[name]
        assert fsdp2[name]["forward_gathers"] > 0
        if name == "loren":  # K = 10 loss all-reduces (16 B) + its one documented all-reduce of the K column
            # sums of u in float64: 8·K·Σin B, Σin = 1408 for tiny-llama (docs/optimizers.md, LOREN)
            assert (fsdp2[name]["other_calls"], fsdp2[name]["other"]) == (11, 10 * 16 + 8 * 10 * 1408)
            continue
        assert 0 < fsdp2[name]["other"] <= 64  # scalar losses only (DESIGN invariant 3)
    for ranks in ("1", "2"):
        assert finite_positive(result["scaling"]["fsdp2"][ranks]["examples_per_s_per_rank"])


def test_comm_counter_splits_forward_gathers_from_the_rest():
    counter = CommCounter()
    gather = counter._wrap("all_gather_into_tensor", lambda out, inp: None)
    reduce = counter._wrap("all_reduce", lambda t: None)
    counter.in_forward = 1
    gather(torch.zeros(10), torch.zeros(5))  # output 40 bytes
    reduce(torch.zeros(2))  # a scalar all-reduce inside the loss is not a parameter gather
    counter.in_forward = 0
    reduce(torch.zeros(3, dtype=torch.float64))
    assert counter.bytes == {"forward_gathers": 40, "other": 8 + 24}
    assert counter.calls == {"forward_gathers": 1, "other": 2}


def test_comm_counter_counts_nested_collectives_once():
    counter = CommCounter()
    inner = counter._wrap("all_gather_into_tensor", lambda out, inp: None)
    outer = counter._wrap("all_gather", lambda outs, inp: inner(torch.zeros(4), inp))
    outer([torch.zeros(2), torch.zeros(2)], torch.zeros(2))
    assert counter.bytes["other"] == 16 and counter.calls["other"] == 1


def test_reference_mezo_is_a_mezo_step():
    """With lr = 0 the reference restores the weights (up to fp rounding); with lr > 0 it moves them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1).requires_grad_(False)
    x = torch.randn(16, 8)
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn() -> float:
        return float((model(x) ** 2).mean())

    record = ReferenceMeZO(model, eps=1e-3, lr=0.0).step(loss_fn, 1)
    assert record["forward_passes"] == 2 and math.isfinite(record["projected_grad"])
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
    ReferenceMeZO(model, eps=1e-3, lr=1e-1).step(loss_fn, 2)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
