"""The convergence protocol (zofsdp.measure.protocol): crossing times, S, the bootstrap CI, power, resuming,
the time budget, and one pass through the real trainer on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from zofsdp.measure import protocol as P

SETTINGS = {"model": "fake", "batch_size": 1, "steps": 20, "num_eval": 3, "eval_split": "dev", "eval_steps": [10]}


def curve(losses, passes):
    return [{"step": i, "forward_passes": t, "loss": float(x), "accuracy": 0.5} for i, (t, x) in
            enumerate(zip(passes, losses))]


def test_crossing_interpolates_linearly_in_forward_passes():
    pts = curve([1.0, 0.8, 0.4], [0, 10, 20])
    assert P.crossing(pts, 0.6) == pytest.approx(15.0)
    assert P.crossing(pts, 0.8) == pytest.approx(10.0)
    assert P.crossing(pts, 0.3) is None
    assert P.crossing(pts, 1.0) == 0.0


def run(points, seed=0):
    return {"seed": seed, "points": points}


def test_speedup_is_recovered_on_curves_with_a_known_speedup():
    """The arm makes the same progress in half the forward passes: S = 2 exactly on its own grid, and within
    3 % when both are evaluated on one grid (linear interpolation of a convex curve)."""
    grid = np.arange(0, 161, 4)
    base = {s: run(curve(np.exp(-grid / (60.0 + 5 * s)), grid), s) for s in range(3)}
    half = {s: run(curve(np.exp(-grid / (60.0 + 5 * s)), grid / 2), s) for s in range(3)}
    same_grid = {s: run(curve(np.exp(-2 * grid / (60.0 + 5 * s)), grid), s) for s in range(3)}
    for f in P.FRACTIONS:
        level = P.target_loss(list(base.values()), f)
        assert list(P.speedups(base, half, level)["per_seed"].values()) == pytest.approx([2.0] * 3, rel=1e-12)
        assert list(P.speedups(base, same_grid, level)["per_seed"].values()) == pytest.approx([2.0] * 3, rel=0.03)
        assert list(P.speedups(base, base, level)["per_seed"].values()) == [1.0] * 3
    slow = {s: run(curve(np.full(grid.size, 1.0), grid), s) for s in range(3)}  # never reaches L*
    out = P.speedups(base, slow, P.target_loss(list(base.values()), 0.5))
    assert out["censored"] == 3 and all(v < 1 for v in out["per_seed"].values())


def test_target_loss_is_the_fraction_of_the_mean_curves_improvement():
    grid = [0, 10, 20]
    runs = [run(curve([1.0, 0.7, 0.6], grid)), run(curve([1.0, 0.5, 0.2], grid), 1)]
    assert P.target_loss(runs, 0.5) == pytest.approx(1.0 - 0.5 * (1.0 - 0.4))
    assert P.target_loss(runs, 0.8) == pytest.approx(1.0 - 0.8 * (1.0 - 0.4))


def test_bootstrap_ci_covers_the_true_speedup():
    """200 simulated studies of 8 seeds, log S ~ N(log 2, 0.3²): the 95 % interval holds 2 in ≥ 85 % of them
    (percentile bootstrap under-covers a little at 8 seeds) and is no wider than needed (holds 1.37 rarely)."""
    rng = np.random.default_rng(1)
    hits, wrong = 0, 0
    for study in range(200):
        values = np.exp(rng.normal(math.log(2), 0.3, size=8)).tolist()
        gm, lo, hi = P.geometric_ci(values, reps=2000, seed=study)
        assert lo <= gm <= hi
        hits += lo <= 2 <= hi
        wrong += lo <= 1.0 <= hi
    assert hits >= 170, hits
    assert wrong <= 10, wrong


def test_power_and_decision_rule():
    assert P.seeds_needed(0.4) == pytest.approx(8.77, abs=0.05)  # the review: n ≈ 9 at SD 0.4, ≈ 5 at 0.3
    assert P.seeds_needed(0.3) == pytest.approx(4.93, abs=0.05)
    assert P.decision((1.6, 2.5)) == "2x supported"
    assert P.decision((1.1, 1.4)) == "2x refuted"
    assert P.decision((1.2, 2.5)) == "open"
    assert P.decision((2.1, 3.5)) == "above 2x"
    assert P.decision((1.6, 2.5), num_seeds=2).startswith("none")  # 2 seeds: the 'CI' is their range


class FakeTrainer:
    """run_one stand-in: records its calls; a run 'diverges' at lr >= diverge_at; the clock moves 10 per run."""

    def __init__(self, diverge_at=math.inf):
        self.calls, self.now, self.diverge_at = [], 0.0, diverge_at

    def __call__(self, arm, seed, lr, overrides):
        self.calls.append((arm, seed, lr))
        self.now += 10
        grid = [0, 10, 20]
        return {"kind": "run", "commit": "x", "arm": arm, "seed": seed, "lr": lr, "overrides": overrides,
                "settings": SETTINGS, "points": curve([1.0, 1.0 - lr / 10, 1.0 - lr / 5], grid),
                "diverged": lr >= self.diverge_at, "mean_keep_fraction": 0.4, "mean_budget": 0.37,
                "median_step_s": 1.0}

    def clock(self):
        return self.now


def plan(arms=("mezo", "mezo:table"), lrs=(1.0, 2.0, 4.0)):
    return P.Plan(list(arms), list(lrs), [0], [0, 1, 2], SETTINGS)


def test_rerun_skips_finished_runs(tmp_path):
    path, fake = tmp_path / "r.jsonl", FakeTrainer(diverge_at=4.0)
    P.execute(plan(), path, fake, None, clock=fake.clock)
    # stage A: lr 1, 2, 4 (diverged: stop) per arm on seed 0; stage B: seeds 1, 2 at lr 2 (seed 0 reused)
    assert fake.calls == [("mezo", 0, 1.0), ("mezo", 0, 2.0), ("mezo", 0, 4.0), ("mezo:table", 0, 1.0),
                          ("mezo:table", 0, 2.0), ("mezo:table", 0, 4.0), ("mezo", 1, 2.0), ("mezo:table", 1, 2.0),
                          ("mezo", 2, 2.0), ("mezo:table", 2, 2.0)]
    again = FakeTrainer(diverge_at=4.0)
    assert P.execute(plan(), path, again, None, clock=again.clock)["launched"] == 0 and again.calls == []
    assert len(P.read_results(path)) == 10
    bigger = P.Plan(["mezo", "mezo:table"], [1.0, 2.0, 4.0], [0], [0, 1, 2, 3], SETTINGS)  # the study grows
    P.execute(bigger, path, again, None, clock=again.clock)
    assert again.calls == [("mezo", 3, 2.0), ("mezo:table", 3, 2.0)]


def test_timing_runs_after_the_runs_and_again_when_an_arm_is_added(tmp_path):
    path, fake = tmp_path / "r.jsonl", FakeTrainer()

    def timing(results):
        fake.calls.append("timing")
        arms = {r["arm"] for r in results if r["kind"] == "run"}
        return {"kind": "timing", "settings": SETTINGS, "step_s": dict.fromkeys(arms, 1.0)}

    P.execute(plan(lrs=(1.0,)), path, fake, None, timing=timing, clock=fake.clock)
    assert fake.calls[-1] == "timing" and fake.calls.count("timing") == 1
    P.execute(plan(lrs=(1.0,)), path, fake, None, timing=timing, clock=fake.clock)
    assert fake.calls.count("timing") == 1  # nothing new
    P.execute(plan(arms=("mezo", "mezo:table", "curvzo"), lrs=(1.0,)), path, fake, None, timing=timing,
              clock=fake.clock)
    assert fake.calls.count("timing") == 2 and fake.calls[-1] == "timing"
    assert set(P.steady_step_times(P.read_results(path), SETTINGS)) == {"mezo", "mezo:table", "curvzo"}


def test_wall_ratios_pair_each_arm_with_mezo_in_one_timing_record():
    older = {"kind": "timing", "settings": SETTINGS, "step_s": {"mezo": 4.0, "curvzo": 2.0}}
    newer = {"kind": "timing", "settings": SETTINGS, "step_s": {"mezo": 3.0, "uniform": 1.0}}
    lone = {"kind": "timing", "settings": SETTINGS, "step_s": {"adalezo": 1.0}}  # no MeZO: no ratio
    times = P.steady_step_times([older, newer, lone], SETTINGS)
    assert times == {"mezo": (3.0, 3.0), "uniform": (1.0, 3.0), "curvzo": (2.0, 4.0)}


def test_first_divergent_lr_stops_the_sweep(tmp_path):
    fake = FakeTrainer(diverge_at=2.0)
    P.execute(plan(arms=("mezo",), lrs=(1.0, 2.0, 4.0, 8.0)), tmp_path / "r.jsonl", fake, None, clock=fake.clock)
    assert [c for c in fake.calls if c[1] == 0] == [("mezo", 0, 1.0), ("mezo", 0, 2.0)]
    assert {c[2] for c in fake.calls if c[1] > 0} == {1.0}


def test_time_budget_stops_launches_and_a_rerun_goes_on(tmp_path):
    path, fake = tmp_path / "r.jsonl", FakeTrainer()
    out = P.execute(plan(lrs=(1.0,)), path, fake, time_budget_s=25, clock=fake.clock)
    assert out == {"launched": 3, "stopped_by_budget": True}  # launched at t = 0, 10, 20; not at 30
    rest = FakeTrainer()
    assert P.execute(plan(lrs=(1.0,)), path, rest, None, clock=rest.clock)["launched"] == 3
    assert len(P.read_results(path)) == 6  # 2 arms × 3 seeds, nothing run twice


def test_uniform_control_waits_for_curvzo_and_takes_its_mean_budget(tmp_path):
    path, fake = tmp_path / "r.jsonl", FakeTrainer()
    p = plan(arms=("mezo", "curvzo", "uniform"), lrs=(1.0,))
    assert p.arm_overrides([], "uniform") is None
    P.execute(p, path, fake, None, clock=fake.clock)
    uniform = [r for r in P.read_results(path) if r["arm"] == "uniform"]
    assert len(uniform) == 3 and "zo.curvzo.budget_init=0.37" in uniform[0]["overrides"]
    assert "zo.curvzo.score=uniform" in uniform[0]["overrides"]
    results = P.read_results(path)
    text = P.markdown(P.summarize(results, SETTINGS, ["mezo", "curvzo", "uniform"], [1.0], [0]), results, SETTINGS, [0])
    assert "| uniform | 1 | 3 |" in text


def test_protocol_on_the_tiny_model(tmp_path, monkeypatch):
    """Real trainer, 2 arms, 1 seed, 3 steps, evaluations after every step (train.eval_steps), the timing; a rerun
    launches nothing and --report rebuilds the same table from the file."""
    from zofsdp.measure.bench import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = tmp_path / "protocol.jsonl"
    argv = ["--quick", "--sections", "protocol", "--optimizers", "mezo", "mezo:table", "--steps", "3",
            "--lrs", "1e-3", "--sweep-seeds", "0", "--seeds", "0", "--timing-warmup", "1", "--timing-reps", "1",
            "--results", str(results), "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "a.json")]
    assert main(argv) == 0
    lines = P.read_results(results)
    runs = [r for r in lines if r["kind"] == "run"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == [("mezo", 0), ("mezo:table", 0)]
    assert [p["step"] for p in runs[0]["points"]] == [0, 1, 2, 3]
    assert [p["forward_passes"] for p in runs[0]["points"]] == [0, 2, 4, 6]
    assert all(r["commit"] and r["lr"] == 1e-3 for r in runs)
    # step 0 is the same model on the same sentences for both arms of a seed
    by = {(r["arm"], r["seed"]): r["points"][0]["loss"] for r in runs}
    assert by[("mezo", 0)] == by[("mezo:table", 0)]
    assert [r["kind"] for r in lines].count("timing") == 1
    first = json.loads((tmp_path / "a.json").read_text())["protocol"]
    assert first["launched"] == 2
    assert main([*argv, "--json", str(tmp_path / "b.json")]) == 0
    assert len(P.read_results(results)) == len(lines)
    assert main([*argv, "--report", "--json", str(tmp_path / "c.json")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())["protocol"]
    assert report["table"] == first["table"] and report["launched"] == 0
    assert "| mezo:table | 0.001 | 1 |" in report["table"]


def test_every_arm_is_a_valid_config_and_the_landscape_arm_reads_the_committed_sampler(monkeypatch):
    """Each arm's overrides load; curvzo:landscape's probs_file (relative: the protocol runs from the repo root)
    gives all 32 SmolLM2 layer units a probability from docs/landscape.json's best layer sampler."""
    from zofsdp.config import load_config
    from tests.conftest import ROOT
    from zofsdp.optim.sampling import build_units, read_probs

    monkeypatch.chdir(ROOT)
    for overrides in P.ARMS.values():
        load_config(None, list(overrides))
    cfg = load_config(None, list(P.ARMS["curvzo:landscape"])).zo.curvzo
    groups = ["embed", *(f"layers.{i}" for i in range(30)), "head"]
    units = build_units([(f"{g}.weight", 10, g) for g in groups], cfg.granularity)
    probs = read_probs(cfg.probs_file, units, cfg.granularity)
    assert probs.numel() == 32 and bool(((probs > 0) & (probs <= 1)).all())
    assert cfg.weight_power == 0.0


def gpu_check(mezo_s, sparse):
    """A gpu_check result: MeZO's step and {name: (keep fraction, step s)}."""
    return {"device": "H100", "step": {"model": "opt-30b", "dtype": "bfloat16", "batch": 16, "seq": 64,
                                       "step_s": mezo_s,
                                       "optimizers": {n: {"keep_fraction": k, "step_s": t} for n, (k, t) in
                                                      sparse.items()}}}


def test_step_time_model_fits_the_line_through_dense_and_sparse_steps():
    model = P.step_time_model(gpu_check(0.568, {"curvzo": (0.30, 0.2 + 0.368 * 0.30), "adalezo": (0.23, 0.2 + 0.368 * 0.23)}))
    assert model["a"] == pytest.approx(0.2) and model["b"] == pytest.approx(0.368)
    s50 = {"geomean": 1.0, "ci": [0.8, 1.25], "per_seed": dict.fromkeys(range(8), 1.0)}
    p = P.project(s50, 0.30, model)
    ratio = (0.2 + 0.368 * 0.30) / 0.568
    assert p["step_ratio"] == pytest.approx(ratio)
    assert p["geomean"] == pytest.approx(1 / ratio) and p["ci"] == pytest.approx([0.8 / ratio, 1.25 / ratio])
    assert P.project(s50, 1.0, model)["geomean"] == pytest.approx(1.0)  # a dense arm keeps its S
    with pytest.raises(ValueError, match="no sparse steps"):
        P.step_time_model({"step": {"step_s": 1.0}})


def test_step_model_file_takes_the_last_check_with_sparse_steps(tmp_path):
    from zofsdp.errors import MissingFile, UserError

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps([gpu_check(1.0, {"curvzo": (0.5, 0.75)}), gpu_check(2.0, {}),
                                {"step": {"step_s": 3.0}}]))
    assert P.read_step_model(str(path))["points"] == [(1.0, 1.0), (0.5, 0.75)]
    with pytest.raises(MissingFile, match="--step-model: file not found"):
        P.read_step_model(str(tmp_path / "none.json"))
    path.write_text(json.dumps({"step": {"step_s": 3.0}}))
    with pytest.raises(UserError, match="no GPU check with sparse steps"):
        P.read_step_model(str(path))


def test_report_projects_s50_when_given_a_step_model(tmp_path):
    path, fake = tmp_path / "r.jsonl", FakeTrainer()
    P.execute(plan(arms=("mezo", "curvzo", "uniform"), lrs=(1.0,)), path, fake, None, clock=fake.clock)
    results = P.read_results(path)
    model = P.step_time_model(gpu_check(1.0, {"curvzo": (0.5, 0.75)}))
    summary = P.summarize(results, SETTINGS, ["mezo", "curvzo"], [1.0], [0], model)
    row = summary["arms"]["curvzo"]
    expect = row["S50"]["geomean"] / (0.5 + 0.5 * row["mean_keep_fraction"])
    assert row["S50"]["projected"]["geomean"] == pytest.approx(expect)
    text = P.markdown(summary, results, SETTINGS, [0])
    assert "S50 projected (CI)" in text and "t(k) = 500 ms + 500 ms × k" in text
    plain = P.markdown(P.summarize(results, SETTINGS, ["mezo", "curvzo"], [1.0], [0]), results, SETTINGS, [0])
    assert "projected" not in plain
