"""SmolLM2-135M on SST-2 for every optimizer: a small learning-rate sweep, picked by dev loss (issue 13).

    OMP_NUM_THREADS=1 nice -n 5 python launch/sst2_sweep.py --out runs/sweep --json docs/sst2_sweep.json \
        [--only mezo,dizo]     (start it twice for two workers: they share the job list)

Every run: the same seed, data, batch and steps (SETTINGS), one process, fp32, one thread; evaluated on the
same 200 dev sentences after the last step. The step-0 evaluation is the same model for every run, so it
is done once (the first run) and reused. Runs already in --json are skipped, so workers and later
additions (a new optimizer) fill the same file; `--table` prints the markdown table from it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
from pathlib import Path

SETTINGS = ["model.name_or_path=smollm2-135m", "model.dtype=float32", "data.task=sst2", "data.num_train=1000",
            "data.num_dev=200", "data.eval_split=dev", "train.steps=20", "train.batch_size=16",
            "train.eval_every=0", "train.eval_batch_size=32", "train.seed=0", "train.save_model=false",
            "train.overwrite=true", "zo.eps=1e-3", "zo.noise_threads=1", "parallel.backend=none"]
"""zo.eps is MeZO's 1e-3 for all (DiZO's ε_p is its own field)."""

GRID = {"mezo": [1e-4, 3e-4], "dizo": [1e-4, 3e-4], "zo_adam": [1e-5, 1e-4], "hizoo": [1e-4, 3e-4],
        "curvzo": [1e-4, 3e-4], "adalezo": [1e-4, 3e-4], "bszo": [1e-4, 3e-4], "bszo_b": [1e-4, 3e-4],
        "loren": [1e-5, 3e-5]}
"""SGD-like updates around MeZO's SmolLM2 1e-4 (docs/optimizers.md); ZO-Adam's per-element steps and
LOREN's undamped momentum (×~10) lower."""

EXTRA = {"dizo": ["zo.dizo.interval=10"]}
"""DiZO projects every 50 steps in the paper: in a 20-step run it would never project (= MeZO)."""


def run(name: str, lr: float, out: Path, step0: dict | None) -> dict:
    from zofsdp import train as trainer
    from zofsdp.config import load_config
    from zofsdp.metrics import read_metrics

    folder = out / f"{name}_lr{lr:g}"
    cfg = load_config(None, [*SETTINGS, f"zo.optimizer={name}", f"zo.lr={lr}", *EXTRA.get(name, []),
                             f"train.output_dir={folder}"])
    evaluate = trainer._evaluate_and_log
    if step0 is not None:  # the unchanged model: scored once for all runs
        trainer._evaluate_and_log = lambda s, m, step: step0 if step == 0 else evaluate(s, m, step)
    try:
        final = trainer.train(cfg)
    finally:
        trainer._evaluate_and_log = evaluate
    records = read_metrics(folder / "metrics.jsonl")
    steps = [r for r in records if "step_s" in r]
    return {"optimizer": name, "lr": lr, "overrides": EXTRA.get(name, []),
            "dev_accuracy": final["eval_accuracy"], "dev_loss": final["eval_loss"],
            "dev_examples": final["eval_examples"], "forward_passes": steps[-1]["forward_passes"],
            "wall_s": round(steps[-1]["wall_s"], 1), "train_loss_last5": sum(r["loss"] for r in steps[-5:]) / 5}


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"settings": SETTINGS, "runs": []}


def save_run(path: Path, result: dict, step0: dict | None) -> None:
    """Append under a lock (two workers write the same file)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        data["runs"].append(result)
        if step0 is not None:
            data["step0"] = step0
        path.write_text(json.dumps(data, indent=1) + "\n")


def claim(path: Path, name: str, lr: float) -> bool:
    """True if no worker has taken (name, lr) yet, and take it (workers share one job list)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        taken = {(r["optimizer"], r["lr"]) for r in data["runs"]} | {tuple(c) for c in data.get("claimed", [])}
        if (name, lr) in taken:
            return False
        data.setdefault("claimed", []).append([name, lr])
        path.write_text(json.dumps(data, indent=1) + "\n")
        return True


def table(data: dict) -> list[str]:
    """Per optimizer the lr with the lowest dev loss; accuracy ± its binomial standard error."""
    lines = ["| optimizer | lrs tried (dev loss) | chosen lr | forwards | dev loss | dev accuracy ± SE |",
             "|---|---|---|---|---|---|"]
    s0 = data.get("step0")
    if s0:
        se = math.sqrt(s0["eval_accuracy"] * (1 - s0["eval_accuracy"]) / s0["eval_examples"])
        lines.append(f"| (step 0) | | | 0 | {s0['eval_loss']:.4f} | {s0['eval_accuracy']:.3f} ± {se:.3f} |")
    for name in GRID:
        runs = sorted((r for r in data["runs"] if r["optimizer"] == name), key=lambda r: r["lr"])
        if not runs:
            continue
        best = min(runs, key=lambda r: r["dev_loss"] if math.isfinite(r["dev_loss"]) else math.inf)
        acc, n = best["dev_accuracy"], best["dev_examples"]
        tried = ", ".join(f"{r['lr']:g} ({r['dev_loss']:.4f})" for r in runs)
        lines.append(f"| {name} | {tried} | {best['lr']:g} | {best['forward_passes']} | {best['dev_loss']:.4f} | "
                     f"{acc:.3f} ± {math.sqrt(acc * (1 - acc) / n):.3f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--json", default="docs/sst2_sweep.json")
    p.add_argument("--only", default="", help="comma-separated optimizers (default: all of GRID)")
    p.add_argument("--table", action="store_true", help="print the table from --json and exit")
    args = p.parse_args()
    path = Path(args.json)
    if args.table:
        print("\n".join(table(load(path))))
        return 0
    names = args.only.split(",") if args.only else list(GRID)
    # every optimizer's first lr before any second one: a run cut short still has one point per optimizer
    jobs = [(n, GRID[n][i]) for i in range(max(len(g) for g in GRID.values())) for n in names
            if i < len(GRID[n])]
    for name, lr in jobs:
        if not claim(path, name, lr):
            continue
        step0 = load(path).get("step0")
        result = run(name, lr, Path(args.out), step0)
        print(json.dumps(result), file=sys.stderr)
        if step0 is None:
            from zofsdp.metrics import read_metrics

            first = read_metrics(Path(args.out) / f"{name}_lr{lr:g}" / "metrics.jsonl")
            step0 = next(r for r in first if r.get("step") == 0 and "eval_accuracy" in r)
        save_run(path, result, step0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
