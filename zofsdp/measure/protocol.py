"""`zofsdp bench --sections protocol`: a convergence protocol that can tell a 2× speedup over MeZO from noise
(issue 14 item 5; the design is ../shared/CURVZO-REVIEW.md §3).

Arms: MeZO (gaussian noise); the placebo, MeZO with zo.noise=table (the same algorithm, so its speedup must be 1);
CurvZO and AdaLeZO at their defaults; the uniform-sparse control (CurvZO with score=uniform: π flat at CurvZO's
mean budget, nothing learned); optionally AdaLeZO with the public code's preset.
Stage A: per arm, learning rates from low to high on the sweep seeds, stopping at the first divergent one; the
arm's lr is the one with the lowest mean final held-out loss. Stage B: every arm at its lr on the same seeds
(train.seed fixes the training batches and the held-out sentences, so arms are paired per seed). A sweep seed's
run at the chosen lr is reused as that seed's stage-B run (say so when reporting; pass disjoint seeds to avoid it).
Timing: each arm's steady-state step time, arms interleaved on one model after warm-up steps.

Statistic: L*(f) = the held-out loss at which the seed-averaged MeZO curve has made the fraction f (0.5, 0.8) of
its improvement from step 0 to the last step. Per seed, S = t_MeZO(L*)/t_arm(L*), t in forward passes, linearly
interpolated between evaluations at the first crossing; the geometric mean over seeds with a 95 % bootstrap CI
(seeds resampled); S_wall = S × (MeZO step time / arm step time).
Decision (review §3): the placebo's CI must contain 1, else the protocol is broken; an arm's 2× is "supported" if
its S_wall CI contains 2 and its lower end is ≥ 1.5, "refuted" if its upper end is < 1.5, otherwise open.

Every finished run (and the timing) is appended as one JSON line to the results file; a rerun skips what is
there, so the study grows by rerunning the same command. `--time-budget MIN` stops launching runs after MIN
minutes; `--report` recomputes the tables from the results file alone.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BASE, PLACEBO, UNIFORM, CURVZO = "mezo", "mezo:table", "uniform", "curvzo"
ARMS = {
    BASE: ["zo.optimizer=mezo", "zo.noise=gaussian"],
    PLACEBO: ["zo.optimizer=mezo", "zo.noise=table"],
    CURVZO: ["zo.optimizer=curvzo"],
    UNIFORM: ["zo.optimizer=curvzo", "zo.curvzo.score=uniform"],  # + budget_init = CurvZO's mean budget
    # sparsity alone, at a tenth: HT-weighted, so at MeZO's lr the update has MeZO's mean and (isotropic) variance,
    # while a step generates noise for ~10 % of the weights (the GPU's cost with bf16 weights, docs/gpu_check.md)
    "uniform:0.1": ["zo.optimizer=curvzo", "zo.curvzo.score=uniform", "zo.curvzo.budget_init=0.1"],
    "adalezo": ["zo.optimizer=adalezo"],
    "adalezo:public": ["zo.optimizer=adalezo", "zo.adalezo.preset=public"],
    # the oracle control: the landscape bench's best (biased, α = 0) layer sampler, fixed; run from the repo root
    "curvzo:landscape": ["zo.optimizer=curvzo", "zo.curvzo.score=fixed", "zo.curvzo.probs_file=docs/landscape.json",
                         "zo.curvzo.weight_power=0"],
    # the oracle's rule with π learned: CurvZO's own √Ĝ sampler under its budget, not reweighted (α = 0)
    "curvzo:a0": ["zo.optimizer=curvzo", "zo.curvzo.weight_power=0"],
    # the oracle's ranking learned: π ∝ population energy / batch noise from one probe on two batches
    "curvzo:snr": ["zo.optimizer=curvzo", "zo.curvzo.score=snr", "zo.curvzo.weight_power=0"],
    # the same ranking from the per-example losses of the step's own two forwards (no extra forward)
    "curvzo:rows": ["zo.optimizer=curvzo", "zo.curvzo.score=snr_rows", "zo.curvzo.weight_power=0"],
    # the learned preconditioner: capped curvature steps and π ∝ Ĝ/tr Ĥ while lr·Σ tr Ĥ > κ, else MeZO + ℓ₀
    "curvzo:step": ["zo.optimizer=curvzo", "zo.curvzo.sampling=curv_step", "zo.curvzo.curvature_every=10",
                    "zo.curvzo.weight_power=0"],
}
DEFAULT_ARMS = [BASE, PLACEBO, CURVZO, UNIFORM, "adalezo"]
ADAPTIVE = (CURVZO, "adalezo", "adalezo:public")
"""Arms whose step cost depends on learned state: warmed up before timing."""
EVAL_STEPS = (5, 10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 400, 600, 800)
FRACTIONS = (0.5, 0.8)
DIVERGED = 1.2
MIN_SEEDS = 3
"""Fewer paired seeds give a bootstrap 'interval' that is just the range of the values: no decision from it."""
"""A run diverged if it raised, or its last held-out loss is non-finite or above DIVERGED × its first."""


# ---------------------------------------------------------------------------------------------- statistics


def crossing(points: list[dict], level: float, key: str = "forward_passes") -> float | None:
    """First `key` at which the loss reaches `level`, linear between evaluations; None if it never does."""
    for before, after in itertools.pairwise(points):
        if before["loss"] <= level:
            return float(before[key])
        if after["loss"] <= level:
            frac = (before["loss"] - level) / (before["loss"] - after["loss"])
            return before[key] + frac * (after[key] - before[key])
    return float(points[-1][key]) if points and points[-1]["loss"] <= level else None


def mean_curve(runs: list[dict]) -> list[dict]:
    """Seed-averaged loss at the evaluation steps all runs share."""
    steps = sorted(set.intersection(*[{p["step"] for p in r["points"]} for r in runs]))
    return [{"step": s, "loss": float(np.mean([next(p["loss"] for p in r["points"] if p["step"] == s)
                                                for r in runs]))} for s in steps]


def target_loss(base_runs: list[dict], fraction: float) -> float:
    curve = mean_curve(base_runs)
    return curve[0]["loss"] - fraction * (curve[0]["loss"] - curve[-1]["loss"])


def speedups(base: dict[int, dict], arm: dict[int, dict], level: float) -> dict:
    """Per paired seed S = t_base/t_arm; a curve that never reaches `level` counts its last point (censored)."""
    out, censored = {}, 0
    for seed in sorted(set(base) & set(arm)):
        t = []
        for run in (base[seed], arm[seed]):
            hit = crossing(run["points"], level)
            censored += hit is None
            t.append(hit if hit is not None else float(run["points"][-1]["forward_passes"]))
        out[seed] = t[0] / t[1] if t[1] > 0 else math.inf
    return {"per_seed": out, "censored": censored}


def geometric_ci(values: list[float], reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Geometric mean and its 95 % percentile-bootstrap interval, resampling the seeds."""
    logs = np.log(np.asarray(values, dtype=np.float64))
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, len(logs), size=(reps, len(logs)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


def seeds_needed(sd_log: float, gap: float = math.log(2 / 1.37)) -> float:
    """Paired seeds to separate 2× from the noise-savings-only 1.37× at 80 % power, α = 0.05 (two-sided)."""
    return ((1.96 + 0.84) * sd_log / gap) ** 2


def decision(ci: tuple[float, float], num_seeds: int = MIN_SEEDS) -> str:
    if num_seeds < MIN_SEEDS:
        return f"none ({num_seeds} seeds < {MIN_SEEDS})"
    lo, hi = ci
    if lo > 2:  # the whole interval beyond the target (≤ 0.5× MeZO's time), not merely consistent with it
        return "above 2x"
    if lo <= 2 <= hi and lo >= 1.5:
        return "2x supported"
    return "2x refuted" if hi < 1.5 else "open"


# ---------------------------------------------------------------------------------------------- results file


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def find(results: list[dict], settings: dict, arm: str, seed: int | None = None, lr: float | None = None) -> list[dict]:
    return [r for r in results if r.get("kind") == "run" and r["settings"] == settings and r["arm"] == arm
            and (seed is None or r["seed"] == seed) and (lr is None or r["lr"] == lr)]


def chosen_lr(results: list[dict], settings: dict, arm: str, lrs: list[float], sweep_seeds: list[int]) -> float | None:
    """Stage A's pick: lowest mean final loss among the lrs below the first divergent one, once the sweep is done."""
    best = None
    for lr in sorted(lrs):
        runs = [find(results, settings, arm, seed, lr) for seed in sweep_seeds]
        if not all(runs):
            return None  # sweep not finished
        runs = [r[-1] for r in runs]
        if any(r["diverged"] for r in runs):
            break
        loss = float(np.mean([r["points"][-1]["loss"] for r in runs]))
        if best is None or loss < best[0]:
            best = (loss, lr)
    return best[1] if best else min(lrs)


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What to run, in order, given what the results file holds."""

    arms: list[str]
    lrs: list[float]
    sweep_seeds: list[int]
    seeds: list[int]
    settings: dict

    def arm_overrides(self, results: list[dict], arm: str) -> list[str] | None:
        """The arm's overrides; the uniform control needs CurvZO's mean budget (None until CurvZO's sweep is done)."""
        if arm != UNIFORM:
            return list(ARMS[arm])
        lr = chosen_lr(results, self.settings, CURVZO, self.lrs, self.sweep_seeds)
        runs = [r for s in self.sweep_seeds for r in find(results, self.settings, CURVZO, s, lr)] if lr else []
        if not runs:
            return None
        budget = round(min(max(float(np.mean([r["mean_budget"] for r in runs])), 0.1), 0.5), 3)
        return [*ARMS[UNIFORM], f"zo.curvzo.budget_init={budget}"]

    def sweep(self, results: list[dict]):
        """Stage A: yields (arm, seed, lr, overrides) still missing; reads `results` afresh at every step."""
        for arm in self.arms:
            for lr in sorted(self.lrs):
                for seed in self.sweep_seeds:
                    overrides = self.arm_overrides(results, arm)
                    if overrides is not None and not find(results, self.settings, arm, seed, lr):
                        yield arm, seed, lr, overrides
                done = [find(results, self.settings, arm, s, lr) for s in self.sweep_seeds]
                if all(done) and any(r[-1]["diverged"] for r in done):
                    break

    def main(self, results: list[dict]):
        """Stage B, seed by seed so the arms stay paired when the budget runs out."""
        for seed in self.seeds:
            for arm in self.arms:
                lr = chosen_lr(results, self.settings, arm, self.lrs, self.sweep_seeds)
                overrides = self.arm_overrides(results, arm)
                if lr is not None and overrides is not None and not find(results, self.settings, arm, seed, lr):
                    yield arm, seed, lr, overrides


def execute(plan: Plan, results_path: Path, run_one, time_budget_s: float | None, timing=None,
            clock=time.monotonic) -> dict:
    """Runs what is missing (stage A, stage B, then the timing) until done or the time budget is spent.
    `run_one(arm, seed, lr, overrides) -> record` trains; `timing(results) -> record` times the arms."""
    start, launched, stopped = clock(), 0, False

    def out_of_time() -> bool:
        return time_budget_s is not None and clock() - start >= time_budget_s

    for stage in (plan.sweep, plan.main, "timing"):
        if stage == "timing":
            timed = [set(t["step_s"]) for t in timings(read_results(results_path), plan.settings)]
            if timing is not None and not any(set(plan.arms) <= arms for arms in timed):  # a new arm: time again
                if out_of_time():
                    return {"launched": launched, "stopped_by_budget": True}
                append_result(results_path, timing(read_results(results_path)))
            continue
        results = read_results(results_path)
        for arm, seed, lr, overrides in stage(results):
            if out_of_time():
                stopped = True
                break
            record = run_one(arm, seed, lr, overrides)
            append_result(results_path, record)
            results.append(record)
            launched += 1
        if stopped:
            break
    return {"launched": launched, "stopped_by_budget": stopped}


def timings(results: list[dict], settings: dict) -> list[dict]:
    return [r for r in results if r.get("kind") == "timing" and r["settings"] == settings]


# ---------------------------------------------------------------------------------------------- report


def summarize(results: list[dict], settings: dict, arms: list[str], lrs: list[float], sweep_seeds: list[int],
              step_model: dict | None = None) -> dict:
    picked = {arm: chosen_lr(results, settings, arm, lrs, sweep_seeds) for arm in arms}
    curves = {arm: {r["seed"]: r for r in find(results, settings, arm, lr=picked[arm])} for arm in arms if picked[arm]}
    base = curves.get(BASE, {})
    if not base:
        return {"lrs": picked, "arms": {}, "note": "no MeZO runs yet"}
    step_s = steady_step_times(results, settings)
    out = {}
    for arm, runs in curves.items():
        row = {"lr": picked[arm], "seeds": sorted(set(runs) & set(base)),
               "final_loss": float(np.mean([r["points"][-1]["loss"] for r in runs.values()])),
               "final_accuracy": float(np.mean([r["points"][-1]["accuracy"] for r in runs.values()])),
               "mean_keep_fraction": float(np.mean([r["mean_keep_fraction"] for r in runs.values()])),
               "step_s": step_s[arm][0] if arm in step_s else None,
               "mezo_step_s": step_s[arm][1] if arm in step_s else None,  # in the same timing record
               "commits": sorted({r["commit"] for r in runs.values()}),
               "diverged": sum(r["diverged"] for r in runs.values()),
               "run_step_s": float(np.median([r["median_step_s"] for r in runs.values()]))}
        for f in FRACTIONS:
            s = speedups(base, runs, target_loss(list(base.values()), f))
            vals = list(s["per_seed"].values())
            if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
                continue
            gm, lo, hi = geometric_ci(vals)
            ratio = step_s[arm][1] / step_s[arm][0] if arm in step_s else None
            row[f"S{int(f * 100)}"] = {
                "per_seed": s["per_seed"], "censored": s["censored"], "geomean": gm, "ci": [lo, hi],
                "sd_log": float(np.std(np.log(vals), ddof=1)) if len(vals) > 1 else None,
                "wall": None if ratio is None else scaled(gm, lo, hi, ratio, len(vals))}
        if step_model and "S50" in row:
            row["S50"]["projected"] = project(row["S50"], row["mean_keep_fraction"], step_model)
        out[arm] = row
    return {"lrs": picked, "arms": out, "step_s": step_s, "step_model": step_model}


def step_time_model(check: dict) -> dict:
    """t(k) = a + b·k, least squares through a gpu_check result's MeZO step (k = 1) and its sparse steps
    (their mean keep fractions): how a step's time falls with the fraction of weights it perturbs, on the
    machine and model of that check (zofsdp.measure.gpu_check --optimizers)."""
    step = check["step"]
    points = [(1.0, step["step_s"])] + [(o["keep_fraction"], o["step_s"]) for o in step.get("optimizers", {}).values()]
    if len(points) < 2:
        raise ValueError("the GPU check has no sparse steps to fit (run it with --optimizers mezo,curvzo,...)")
    k, t = np.array(points).T
    b, a = np.polyfit(k, t, 1)
    return {"a": float(a), "b": float(b), "points": points, "device": check.get("device", "?"),
            "what": f"{step['model']} {step['dtype']}, batch {step['batch']} x {step['seq']}"}


def read_step_model(path: str) -> dict:
    """The last result in a gpu_check JSON (one result or a list of them) that timed sparse steps."""
    from zofsdp.errors import MissingFile, UserError

    if not Path(path).is_file():
        raise MissingFile(f"--step-model: file not found: {path}")
    data = json.loads(Path(path).read_text())
    checks = [c for c in (data if isinstance(data, list) else [data]) if c.get("step", {}).get("optimizers")]
    if not checks:
        raise UserError(f"--step-model: {path} has no GPU check with sparse steps (gpu_check --optimizers)")
    return step_time_model(checks[-1])


def scaled(geomean: float, lo: float, hi: float, factor: float, num_seeds: int) -> dict:
    """A speedup in forward passes turned into one in time: × (MeZO's step time / the arm's)."""
    return {"geomean": geomean * factor, "ci": [lo * factor, hi * factor],
            "decision": decision((lo * factor, hi * factor), num_seeds)}


def project(s50: dict, keep: float, model: dict) -> dict:
    """S50 in the wall time of `model`'s machine: S ÷ (t(keep) / t(1)). Arithmetic on two measurements."""
    ratio = (model["a"] + model["b"] * keep) / (model["a"] + model["b"])
    return {"step_ratio": ratio, **scaled(s50["geomean"], *s50["ci"], 1 / ratio, len(s50["per_seed"]))}


def steady_step_times(results: list[dict], settings: dict) -> dict:
    """arm -> (its median step s, MeZO's) from the newest interleaved timing record holding both: a wall ratio
    is only read within one record (the same machine load), and an arm timed later keeps older arms' ratios."""
    out = {}
    for rec in reversed(timings(results, settings)):
        for arm, t in rec["step_s"].items():
            if arm not in out and BASE in rec["step_s"]:
                out[arm] = (t, rec["step_s"][BASE])
    return out


def markdown(summary: dict, results: list[dict], settings: dict, sweep_seeds: list[int]) -> str:
    runs = [r for r in results if r.get("kind") == "run" and r["settings"] == settings]
    commits = sorted({r["commit"] for r in runs})
    t = timings(results, settings)
    head = (f"Protocol: {settings['model']}, batch {settings['batch_size']}, {settings['steps']} steps, "
            f"{settings['num_eval']} held-out sentences ({settings['eval_split']}) at steps "
            f"{[0, *settings['eval_steps'], settings['steps']]}; {len(runs)} runs; commits {', '.join(commits)}.")
    lines = [head, ""]
    if t:
        lines.append(f"Step times interleaved after {t[-1]['warmup']} warm-up steps, median of {t[-1]['reps']} "
                     f"(load average {t[-1]['load_average']}; shared machine: {t[-1]['load_average'][0] > 1.5}).")
    model = summary.get("step_model")
    columns = ("arm", "lr", "seeds", "final loss", "final acc", "keep", "step s / MeZO's", "S50 (CI)", "S50 wall (CI)",
               "decision", *(("S50 projected (CI)", "decision") if model else ()), "S80 (CI)", "sd log S50",
               "step s in runs", "commits")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for arm, row in summary["arms"].items():
        s50, s80 = row.get("S50"), row.get("S80")
        wall = s50 and s50["wall"]
        lines.append(" | ".join([
            f"| {arm}", f"{row['lr']:g}", str(len(row["seeds"])) + (f" ({row['diverged']} diverged)" if row["diverged"]
                                                                   else ""), f"{row['final_loss']:.4f}",
            f"{row['final_accuracy']:.3f}", f"{row['mean_keep_fraction']:.2f}",
            f"{row['step_s']:.2f} / {row['mezo_step_s']:.2f}" if row["step_s"] else "-", _cell(s50),
            f"{wall['geomean']:.2f} ({wall['ci'][0]:.2f}–{wall['ci'][1]:.2f})" if wall else "-",
            wall["decision"] if wall and arm != BASE else "-", *(_projected(s50, arm) if model else ()), _cell(s80),
            f"{s50['sd_log']:.3f}" if s50 and s50["sd_log"] is not None else "-", f"{row['run_step_s']:.2f}",
            ", ".join(row["commits"])]) + " |")
    if model:
        lines += ["", f"Projected: S50 ÷ t(keep)/t(1), with t(k) = {model['a'] * 1e3:.0f} ms + {model['b'] * 1e3:.0f} "
                  f"ms × k fitted to the step times of {model['what']} on {model['device']} (keep, s: "
                  + ", ".join(f"{k:.2f}, {t:.3f}" for k, t in model["points"])
                  + "). Arithmetic on two measurements (S on this model, step times on that one), not a run."]
    placebo = summary["arms"].get(PLACEBO, {}).get("S50")
    if placebo:
        ok, n = placebo["ci"][0] <= 1 <= placebo["ci"][1], len(placebo["per_seed"])
        verdict = ("contains 1, the protocol passes its check." if ok else "excludes 1: the protocol is BROKEN.")
        lines += ["", f"Placebo (MeZO with table noise) S50 CI {placebo['ci'][0]:.2f}–{placebo['ci'][1]:.2f} "
                  f"over {n} seeds: " + (verdict if n >= MIN_SEEDS else f"too few seeds to check (needs {MIN_SEEDS}).")]
        if placebo["sd_log"]:
            lines.append(f"Power: SD of log S50 over {n} seeds (placebo) {placebo['sd_log']:.3f} → "
                         f"{seeds_needed(placebo['sd_log']):.1f} paired seeds to tell 2× from 1.37× (80 %, α 0.05).")
    sweep = [r for r in runs if r["seed"] in sweep_seeds]
    if sweep:
        lines += ["", "Stage A (sweep seeds): final loss by lr (d = diverged):", ""]
        for arm in summary["lrs"]:
            cells = [f"{r['lr']:g}: {r['points'][-1]['loss']:.4f}{' d' if r['diverged'] else ''}"
                     for r in sorted(sweep, key=lambda r: r["lr"]) if r["arm"] == arm]
            lines.append(f"- {arm}: " + ", ".join(cells) + f" → {summary['lrs'][arm]}")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], settings: dict, summary: dict, path: Path) -> None:
    """Held-out loss against forward passes: each seed thin, the seed mean thick, L*(50 %, 80 %) dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (arm, lr) in enumerate(summary["lrs"].items()):
        runs = find(results, settings, arm, lr=lr) if lr else []
        if not runs:
            continue
        color = f"C{i}"
        for r in runs:
            ax.plot([p["forward_passes"] for p in r["points"]], [p["loss"] for p in r["points"]], color=color,
                    alpha=0.3, linewidth=0.8)
        mean = mean_curve(runs)
        passes = [p["forward_passes"] for p in runs[0]["points"] if p["step"] in {m["step"] for m in mean}]
        ax.plot(passes, [m["loss"] for m in mean], color=color, linewidth=2, marker="o", label=f"{arm} (lr {lr:g})")
        if arm == BASE:
            for f in FRACTIONS:
                ax.axhline(target_loss(runs, f), color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("forward passes")
    ax.set_ylabel(f"held-out loss ({settings['num_eval']} sentences)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _projected(s50: dict | None, arm: str) -> tuple[str, str]:
    p = s50 and s50.get("projected")
    if not p:
        return "-", "-"
    return f"{p['geomean']:.2f} ({p['ci'][0]:.2f}–{p['ci'][1]:.2f})", p["decision"] if arm != BASE else "-"


def _cell(s: dict | None) -> str:
    if not s:
        return "-"
    censored = f", {s['censored']} censored" if s["censored"] else ""
    return f"{s['geomean']:.2f} ({s['ci'][0]:.2f}–{s['ci'][1]:.2f}){censored}"


# ---------------------------------------------------------------------------------------------- running


def protocol_settings(args) -> dict:
    steps = args.steps
    common = {"model": args.model, "batch_size": args.batch_size, "steps": steps}
    if args.quick:
        return {**common, "eps": 1e-2, "num_train": 48, "num_eval": 24, "eval_split": "dev",
                "eval_steps": [s for s in (1, 2, 3, 4) if s < steps]}
    dense = EVAL_STEPS if args.eval_steps is None else args.eval_steps
    return {**common, "eps": 1e-3, "num_train": 1000, "num_eval": args.num_eval, "eval_split": "eval",
            "eval_steps": [s for s in dense if 0 < s < steps]}


def add_arguments(p) -> None:
    """The protocol's options on `zofsdp bench` (arms are chosen with --optimizers)."""
    p.add_argument("--results", default="docs/protocol_results.jsonl", help="protocol: the JSONL results file")
    p.add_argument("--time-budget", type=float, help="protocol: launch no run after this many minutes")
    p.add_argument("--report", action="store_true", help="protocol: only recompute the tables from --results")
    p.add_argument("--lrs", type=float, nargs="+", default=[2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4],
                   help="protocol: stage A's learning rates")
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1], help="protocol: stage A's seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="protocol: stage B's seeds")
    p.add_argument("--num-eval", type=int, default=500, help="protocol: held-out sentences (validation split)")
    p.add_argument("--eval-steps", type=int, nargs="+", help="protocol: evaluate after these steps (and 0, last)")
    p.add_argument("--timing-warmup", type=int, default=50, help="protocol: steps per arm before timing")
    p.add_argument("--timing-reps", type=int, default=5, help="protocol: timed rounds (0 = no timing)")
    p.add_argument("--step-model", help="protocol: a gpu_check JSON (e.g. docs/gpu_check.json); S50 is also "
                   "projected onto its step times by keep fraction")


def overrides_for(settings: dict, lr: float, seed: int) -> list[str]:
    split = "data.num_dev" if settings["eval_split"] == "dev" else "data.num_eval"
    return [f"train.steps={settings['steps']}", f"zo.eps={settings['eps']}", f"zo.lr={lr}", f"train.seed={seed}",
            f"data.num_train={settings['num_train']}", f"{split}={settings['num_eval']}",
            f"data.eval_split={settings['eval_split']}", f"train.eval_steps={settings['eval_steps']}",
            "train.eval_every=0", "train.eval_batch_size=32", "train.overwrite=true", "train.save_model=false"]


def commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":(top)zofsdp"], cwd=here, capture_output=True,
                               text=True, check=False).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def train_run(args, settings: dict, arm: str, seed: int, lr: float, overrides: list[str]) -> dict:
    """One training run through the real trainer; its curve read back from metrics.jsonl."""
    from zofsdp.errors import UserError
    from zofsdp.measure.common import run_config
    from zofsdp.metrics import read_metrics
    from zofsdp.train import train

    folder = Path(args.out) / "protocol" / f"{arm.replace(':', '-')}_seed{seed}_lr{lr:g}"
    cfg = run_config(args, *overrides_for(settings, lr, seed), *overrides, f"train.output_dir={folder}")
    error = None
    start = time.perf_counter()
    try:
        train(cfg)
    except (UserError, FloatingPointError, RuntimeError) as err:  # non-finite losses: a divergent lr
        error = f"{type(err).__name__}: {err}"
    metrics = read_metrics(folder / "metrics.jsonl")
    points, passes, wall = [], 0, 0.0
    for m in metrics:
        if "forward_passes" in m:
            passes, wall = m["forward_passes"], m["wall_s"]
        if "eval_loss" in m:
            points.append({"step": m["step"], "forward_passes": passes, "wall_s": wall, "loss": m["eval_loss"],
                           "accuracy": m["eval_accuracy"]})
    steps = [m for m in metrics if "step_s" in m]
    late = [m["step_s"] for m in steps if m["step"] > 50] or [m["step_s"] for m in steps]
    last = points[-1]["loss"] if points else math.nan
    diverged = error is not None or not math.isfinite(last) or last > DIVERGED * points[0]["loss"]
    return {"kind": "run", "commit": commit(), "arm": arm, "seed": seed, "lr": lr, "overrides": overrides,
            "settings": settings, "points": points, "diverged": diverged, "error": error,
            "mean_keep_fraction": _mean(steps, "keep_fraction", 1.0), "mean_budget": _mean(steps, "budget", None)
            or _mean(steps, "keep_fraction", 1.0), "median_step_s": float(np.median(late)) if late else None,
            "run_s": time.perf_counter() - start, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _mean(records: list[dict], key: str, default):
    values = [m[key] for m in records if key in m]
    return float(np.mean(values)) if values else default


def time_arms(args, settings: dict, plan: Plan, results: list[dict]) -> dict:
    """Median step time per arm at its lr, arms interleaved on one model: `warmup` steps for each arm whose cost
    moves with its state (CurvZO's budget, AdaLeZO's distinct layers; MeZO, the placebo and the fixed-budget control
    get one), then `reps` timed rounds, each arm once per round on the same batch."""
    import torch

    from zofsdp.config import load_config
    from zofsdp.measure.common import run_config, timed2
    from zofsdp.optim import build_optimizer, param_shapes
    from zofsdp.scoring import encode
    from zofsdp.train import global_loss, setup

    arms = {}
    for arm in plan.arms:
        overrides = plan.arm_overrides(results, arm)
        lr = chosen_lr(results, settings, arm, plan.lrs, plan.sweep_seeds)
        if overrides is not None and lr is not None:
            arms[arm] = load_config(None, [*overrides, f"zo.lr={lr}", f"zo.eps={settings['eps']}"]).zo
    cfg = run_config(args, f"data.num_train={max(settings['num_train'], args.batch_size)}")
    session = setup(cfg)
    backend = session.backend
    players = {arm: build_optimizer(zo, backend.shards(), 0, backend.device, blocks=backend.blocks(),
                                    all_reduce=backend.all_reduce_sum, shapes=param_shapes(backend))
               for arm, zo in arms.items()}
    batch = encode(session.tokenizer, session.splits.train[: args.batch_size], cfg.model.max_length)
    step_s = {arm: [] for arm in players}
    with torch.no_grad():
        for rnd in range(args.timing_warmup + args.timing_reps):
            for arm, player in players.items():
                warm = args.timing_warmup if arm in ADAPTIVE else 1
                if rnd < args.timing_warmup - warm:
                    continue
                t, _, _ = timed2(lambda p=player, r=rnd: p.step(lambda **_: global_loss(session, batch)[0], r + 1))
                if rnd >= args.timing_warmup:
                    step_s[arm].append(t)
    backend.close()
    from zofsdp.measure.common import _load_average

    return {"kind": "timing", "commit": commit(), "settings": settings, "warmup": args.timing_warmup,
            "reps": args.timing_reps, "step_s": {a: float(np.median(t)) for a, t in step_s.items()},
            "all_step_s": step_s, "load_average": _load_average(),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def section_protocol(args) -> dict:
    settings = protocol_settings(args)
    arms = args.optimizers or DEFAULT_ARMS
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        from zofsdp.errors import UserError

        raise UserError(f"protocol arms {unknown} unknown; choose from {list(ARMS)}")
    arms = [BASE, *[a for a in arms if a != BASE]]  # MeZO is the reference of every S
    plan = Plan(arms, sorted(args.lrs), list(args.sweep_seeds), list(args.seeds), settings)
    path = Path(args.results)
    outcome = {"launched": 0, "stopped_by_budget": False}
    if not args.report:
        budget = args.time_budget * 60 if args.time_budget else None
        outcome = execute(plan, path, lambda *a: train_run(args, settings, *a), budget,
                          timing=(lambda res: time_arms(args, settings, plan, res)) if args.timing_reps else None)
    results = read_results(path)
    step_model = read_step_model(args.step_model) if getattr(args, "step_model", None) else None
    summary = summarize(results, settings, arms, plan.lrs, plan.sweep_seeds, step_model)
    table = markdown(summary, results, settings, plan.sweep_seeds)
    if args.plot:
        plot(results, settings, summary, Path(args.plot) / "protocol_curves.png")
    return {"protocol": {"settings": settings, "summary": summary, "table": table, **outcome}}


