"""Convergence part of `zofsdp bench`, and the plots.

Each variant (every registered optimizer, plus MeZO with zo.noise=table) trains with the same seed, data,
batch and evaluation set through the real trainer (`zofsdp.train.train`); the curve is read back from its
metrics.jsonl: held-out accuracy at each evaluation against the cumulative forward passes and the
cumulative step wall time (evaluation time excluded) at that step.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zofsdp.measure.common import TABLE_SUFFIX


def variants(args) -> dict[str, list[str]]:
    from zofsdp.measure.common import wanted
    from zofsdp.optim import OPTIMIZERS

    out = {name: [f"zo.optimizer={name}"] for name in OPTIMIZERS}
    if "mezo" in OPTIMIZERS:
        out["mezo" + TABLE_SUFFIX] = ["zo.optimizer=mezo", "zo.noise=table"]
    return {name: overrides for name, overrides in out.items() if wanted(args, name)}


def settings(args) -> list[str]:
    """Quick: the tiny model, a handful of steps. Full: SmolLM2-135M on SST-2, MeZO's batch, η 1e-4."""
    if args.quick:
        return [f"train.steps={args.steps}", "train.eval_every=3", "data.num_train=48", "data.num_dev=24",
                "data.eval_split=dev", "zo.eps=1e-2", "zo.lr=1e-3", "train.eval_batch_size=24"]
    every = max(1, args.steps // 5)
    return [f"train.steps={args.steps}", f"train.eval_every={every}", "data.num_train=1000",
            "data.num_dev=200", "data.eval_split=dev", "zo.eps=1e-3", "zo.lr=1e-4",
            "train.eval_batch_size=32"]


def curve(metrics: list[dict]) -> dict:
    """Accuracy at each evaluation, with forward passes and wall seconds spent in steps up to it."""
    passes, wall, points = 0, 0.0, []
    for record in metrics:
        if "forward_passes" in record:
            passes, wall = record["forward_passes"], record["wall_s"]
        if "eval_accuracy" in record:
            points.append({"step": record["step"], "forward_passes": passes, "wall_s": wall,
                           "accuracy": record["eval_accuracy"], "loss": record["eval_loss"]})
    return {"points": points}


def to_target(points: list[dict], target: float) -> dict:
    for p in points:
        if p["accuracy"] >= target:
            return {"forward_passes": p["forward_passes"], "wall_s": p["wall_s"], "step": p["step"]}
    return {"forward_passes": None, "wall_s": None, "step": None}


def section_convergence(args) -> dict:
    from zofsdp.measure.common import run_config
    from zofsdp.metrics import read_metrics
    from zofsdp.train import train

    runs, errors = {}, {}
    for name, overrides in variants(args).items():
        folder = Path(args.out) / "convergence" / name.replace(":", "-")
        cfg = run_config(args, *settings(args), *overrides, f"train.output_dir={folder}", "train.seed=0",
                         "train.overwrite=true")
        try:
            train(cfg)
        except Exception as err:  # an optimizer under construction must not sink the others
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"[bench] convergence: {name} failed: {errors[name]}", file=sys.stderr)
            continue
        result = curve(read_metrics(folder / "metrics.jsonl"))
        result["to_target"] = to_target(result["points"], args.target)
        steps = [m for m in read_metrics(folder / "metrics.jsonl") if "step_s" in m]
        result["median_step_s"] = sorted(m["step_s"] for m in steps)[len(steps) // 2] if steps else None
        runs[name] = result
    return {"convergence": {"target_accuracy": args.target, "steps": args.steps, "runs": runs,
                            "settings": settings(args), "errors": errors}}


def markdown_rows(results: dict) -> list[str]:
    conv = results["convergence"]
    lines = [f"Convergence ({conv['steps']} steps; target accuracy {conv['target_accuracy']}):", "",
             "| variant | start acc | best acc | final acc | forward passes to target | wall s to target | "
             "median step s |", "|---|---|---|---|---|---|---|"]
    for name, run in conv["runs"].items():
        accs = [p["accuracy"] for p in run["points"]] or [float("nan")]
        hit, step_s = run["to_target"], run["median_step_s"]
        passes = hit["forward_passes"] if hit["forward_passes"] is not None else "not reached"
        wall = f"{hit['wall_s']:.0f}" if hit["wall_s"] is not None else "-"
        step = f"{step_s:.2f}" if step_s is not None else "-"
        lines.append(f"| {name} | {accs[0]:.3f} | {max(accs):.3f} | {accs[-1]:.3f} | {passes} | {wall} | "
                     f"{step} |")
    return lines + [""]


def plot(results: dict, folder: Path) -> list[Path]:
    """bench_convergence.png (accuracy vs forward passes and vs wall time), bench_overhead.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "convergence" in results:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for name, run in results["convergence"]["runs"].items():
            pts = run["points"]
            for ax, key in zip(axes, ("forward_passes", "wall_s")):
                ax.plot([p[key] for p in pts], [p["accuracy"] for p in pts], marker="o", label=name)
        target = results["convergence"]["target_accuracy"]
        for ax, label in zip(axes, ("forward passes", "step wall time (s)")):
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("held-out accuracy")
        axes[0].legend()
        fig.suptitle(f"SST-2, {results['model']}, batch {results['batch_size']}")
        fig.tight_layout()
        written.append(folder / "bench_convergence.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if "step_overhead" in results:
        ratios = results["step_overhead"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.barh(list(ratios), list(ratios.values()), color="tab:blue")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("ZO step time / time of its forward passes (floor 1.0)")
        ax.invert_yaxis()
        fig.tight_layout()
        written.append(folder / "bench_overhead.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
