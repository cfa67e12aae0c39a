"""`zofsdp memory`: per-rank peak memory of inference vs a ZO step, measured or simulated.

Measured (the configured model, backend and world size; start it the way `train` is started):
    zofsdp memory -c configs/memory_smollm2.yaml [overrides] [--json out.json] [--png out.png]
    torchrun --standalone --nproc_per_node 2 -m zofsdp memory -c ... parallel.backend=fsdp2
Per rank: the peak of (a) an inference forward of the wrapped model on the first training batch and
(b) a full step of each optimizer asked for, the ratio (b)/(a) and a breakdown by category. On CPU the
figures come from PyTorch's memory trackers (process RSS beside them as a cross-check); on CUDA from
`torch.cuda.max_memory_allocated` (the trackers still give the breakdown).

Simulated (never materialised; see zofsdp.measure.simulate for the method and what it leaves out):
    zofsdp memory --simulate --model configs/models/opt-30b.json --world-size 1 2 4 8 \\
        --dtype bf16 --seq-len 256 --batch-size 1 [--json out.json] [--png out.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from zofsdp.measure.tracker import CATEGORIES, OptimizerMeasurement, Peak

log = logging.getLogger("zofsdp")

GIB = 1 << 30
INFERENCE_LEVEL = 1.05
"""A ZO step within 5 % of the inference peak counts as "inference memory" (the tests' threshold)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zofsdp memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="run YAML (measured mode)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.backend=fsdp2")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--png", help="write a bar chart here (needs matplotlib)")
    p.add_argument("--optimizers", default="",
                   help="comma-separated ZO optimizers, or 'all' (default: zo.optimizer; simulate: all)")
    p.add_argument("--steps", type=int, default=1, help="ZO steps per optimizer (a leak check uses 20)")
    p.add_argument("--seq-len", type=int, default=0,
                   help="measured: a synthetic batch of train.batch_size x L tokens instead of task data; "
                        "simulated: tokens per row (default 256)")
    sim = p.add_argument_group("simulation")
    sim.add_argument("--simulate", action="store_true", help="fake tensors and a fake process group")
    sim.add_argument("--model", nargs="+", help="model config JSON(s), e.g. configs/models/opt-30b.json")
    sim.add_argument("--world-size", nargs="+", type=int, default=[1], help="one or more world sizes")
    sim.add_argument("--dtype", default="bf16", help="the shards' dtype (model.dtype): bf16, fp16 or fp32")
    sim.add_argument("--compute-dtype", default="",
                     help="the forward's dtype (model.compute_dtype); default --dtype. fp32 shards with bf16 "
                          "compute is the mixed-precision mode")
    sim.add_argument("--batch-size", type=int, default=1, help="global batch (rows), split over ranks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.simulate:
        if not args.model:
            parser().error("--simulate needs --model CONFIG.json")
        reports = simulate_reports(args)
        if args.png:
            plot_simulated(reports, args.png)
        text = simulated_table(reports)
        _emit(text, reports if len(reports) > 1 else reports[0], args.json)
        return 0
    from zofsdp.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"zofsdp memory: config error: {err}", file=sys.stderr)
        return 2
    report = measure(cfg, _optimizer_names(args.optimizers, cfg.zo.optimizer), args.steps, args.seq_len)
    if report is not None:  # rank 0
        if args.png:
            plot_measured(report, args.png)
        _emit(measured_table(report), report, args.json)
    return 0


def _optimizer_names(spec: str, default: str) -> list[str]:
    from zofsdp.optim import OPTIMIZERS

    if not spec:
        return [default]
    names = list(OPTIMIZERS) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"zofsdp memory: unknown optimizer(s) {unknown}; known: {', '.join(OPTIMIZERS)}")
    return names


def _emit(text: str, report, json_path: str | None) -> None:
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))


def _peak_dict(peak: Peak) -> dict:
    return {"total": peak.total, "phase": peak.phase, "breakdown": peak.breakdown}


def _optimizer_dict(m: OptimizerMeasurement, inference: int) -> dict:
    first = m.steps[0]
    worst = max(m.steps, key=lambda s: s.peak.total)
    return {
        "zo_step": _peak_dict(worst.peak),
        "ratio": worst.peak.total / inference,
        "phases": [{"phase": p.phase, "total": p.total} for p in first.phases],
        "current_after_step": [s.current_after for s in m.steps],
        "peak_per_step": [s.peak.total for s in m.steps],
        "growth_bytes": m.steps[-1].current_after - first.current_after,
        "optimizer_state_bytes": m.optimizer_state_bytes,
        "noise_buffer_bytes": m.noise_buffer_bytes,
    }


# ------------------------------------------------------------------------------------------- measured


def measure(cfg, optimizers: list[str], num_steps: int = 1, seq_len: int = 0) -> dict | None:
    """Measure on every rank; returns the combined report on rank 0 (None elsewhere)."""
    from zofsdp.train import setup

    session = setup(cfg, with_data=seq_len == 0)
    try:
        rank_report = _measure_rank(session, optimizers, num_steps, seq_len)
        reports = _gather(session.backend, rank_report)
    finally:
        session.backend.close()
    if reports is None:
        return None
    return combine(reports, cfg, session.backend, optimizers)


def _first_batch(session, seq_len: int):
    from zofsdp.measure.tracker import synthetic_batch
    from zofsdp.scoring import encode
    from zofsdp.train import batches

    cfg = session.cfg
    if seq_len:
        return synthetic_batch(len(session.tokenizer), cfg.train.batch_size, seq_len)
    examples = next(batches(session.splits.train, cfg.train.batch_size, cfg.train.seed))
    return encode(session.tokenizer, examples, cfg.model.max_length)


def _measure_rank(session, optimizers: list[str], num_steps: int, seq_len: int) -> dict:
    import dataclasses

    import psutil

    from zofsdp.measure.tracker import make_tracker, measure_inference, measure_optimizer
    from zofsdp.optim import build_optimizer, param_shapes
    from zofsdp.train import global_loss

    backend, cfg = session.backend, session.cfg
    batch = _first_batch(session, seq_len)
    cuda = backend.device.type == "cuda"
    process = psutil.Process()

    def forward() -> float:
        return global_loss(session, batch)[0]

    forward()  # warm-up: FSDP2's lazy init and first-call allocations stay out of the figures
    tracker = make_tracker(session.model)
    _reset_cuda(cuda)
    inference = measure_inference(tracker, forward)
    out = {"rank": backend.rank, "inference": _peak_dict(inference), "optimizers": {},
           "rss_bytes": {"after_inference": process.memory_info().rss}}
    if cuda:
        out["cuda_max_allocated_bytes"] = {"inference": torch.cuda.max_memory_allocated()}
    for name in optimizers:
        zo = dataclasses.replace(cfg.zo, optimizer=name)
        _reset_cuda(cuda)
        def build(zo=zo):
            return build_optimizer(zo, backend.shards(), cfg.train.seed, backend.device, blocks=backend.blocks(),
                                   probe=getattr(backend, "probe", None), rounding=cfg.model.update_rounding,
                                   all_reduce=backend.all_reduce_sum, shapes=param_shapes(backend))

        # DiZO: start at a projection step, so that its search (and its temporaries) are measured too
        first = zo.dizo.interval if name == "dizo" else 1
        m = measure_optimizer(tracker, name, build, forward, num_steps, first_step=first)
        out["optimizers"][name] = _optimizer_dict(m, inference.total)
        out["rss_bytes"][f"after_{name}"] = process.memory_info().rss
        if cuda:
            out["cuda_max_allocated_bytes"][name] = torch.cuda.max_memory_allocated()
    out["rss_bytes"]["max_rss_process"] = _max_rss()
    out["load"] = backend.load_report  # host memory while the model loaded (zofsdp.measure.host)
    return out


def _reset_cuda(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _gather(backend, report: dict) -> list[dict] | None:
    import torch.distributed as dist

    if backend.world_size == 1:
        return [report]
    reports = [None] * backend.world_size
    dist.all_gather_object(reports, report)
    return reports if backend.rank == 0 else None


def combine(ranks: list[dict], cfg, backend, optimizers: list[str]) -> dict:
    """One report: per-rank figures plus headline numbers for the worst rank of the first optimizer."""
    cuda = "cuda_max_allocated_bytes" in ranks[0]
    summary = {}
    for name in optimizers:
        if cuda:  # on GPU the allocator's own peak is the headline; the trackers give the breakdown
            inf = max(r["cuda_max_allocated_bytes"]["inference"] for r in ranks)
            step = max(r["cuda_max_allocated_bytes"][name] for r in ranks)
            ratio = max(r["cuda_max_allocated_bytes"][name] / r["cuda_max_allocated_bytes"]["inference"]
                        for r in ranks)
        else:
            inf = max(r["inference"]["total"] for r in ranks)
            step = max(r["optimizers"][name]["zo_step"]["total"] for r in ranks)
            ratio = max(r["optimizers"][name]["ratio"] for r in ranks)
        summary[name] = {"per_rank_peak_bytes": {"inference": inf, "zo_step": step}, "ratio": ratio,
                         "growth_bytes": max(r["optimizers"][name]["growth_bytes"] for r in ranks)}
    head = summary[optimizers[0]]
    return {
        "mode": "measured",
        "source": "torch.cuda.max_memory_allocated" if cuda else "torch.distributed._tools memory trackers",
        "model": cfg.model.name_or_path, "dtype": cfg.model.dtype,
        "compute_dtype": cfg.model.compute_dtype or cfg.model.dtype, "backend": backend.name,
        "world_size": backend.world_size, "device": str(backend.device), "optimizer": optimizers[0],
        "per_rank_peak_bytes": head["per_rank_peak_bytes"], "ratio": head["ratio"],
        "breakdown": {"inference": ranks[0]["inference"]["breakdown"],
                      "zo_step": ranks[0]["optimizers"][optimizers[0]]["zo_step"]["breakdown"]},
        "optimizers": summary, "ranks": ranks,
    }


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.1f} MiB"


def measured_table(report: dict) -> str:
    precision = f"{report['dtype']} shards, {report.get('compute_dtype', report['dtype'])} compute"
    lines = [(f"{report['model']} ({precision}), backend {report['backend']}, world size "
              f"{report['world_size']}, {report['device']}; figures: {report['source']}"),
             "rank  optimizer   inference     zo step       ratio   growth/step  "
             + "  ".join(c for c in CATEGORIES)]
    for r in report["ranks"]:
        for name, o in r["optimizers"].items():
            steps = len(o["current_after_step"])
            growth = o["growth_bytes"] / max(steps - 1, 1)
            cats = "  ".join(_fmt(o["zo_step"]["breakdown"][c]) for c in CATEGORIES)
            lines.append(f"{r['rank']:>4}  {name:<10}  {_fmt(r['inference']['total']):>12}  "
                         f"{_fmt(o['zo_step']['total']):>12}  {o['ratio']:.4f}  {growth:>10.0f} B  {cats}")
        if r.get("load"):
            load = r["load"]
            if "cuda" in report["device"]:  # the shard went to device memory: the host held only transients
                where = f"the shard, {_fmt(load['shard_bytes'])}, went to {report['device']}"
            else:  # k in peak = shard + k x largest: ~0 for FSDP2's lean load, ~2.5 for DeepSpeed's zero.Init
                k = (load['peak_anon_above_baseline'] - load['shard_bytes']) / max(load['largest_tensor_bytes'], 1)
                where = (f"shard {_fmt(load['shard_bytes'])} + {k:.1f} x largest tensor "
                         f"{_fmt(load['largest_tensor_bytes'])}")
            lines.append(f"      host peak while loading: +{_fmt(load['peak_anon_above_baseline'])} anonymous "
                         f"(measured; {where}; resident after "
                         f"+{_fmt(load['anon_after'] - load['baseline_anon'])}; {load['seconds']:.1f} s)")
        rss = r["rss_bytes"]
        lines.append(f"      RSS cross-check: {_fmt(rss['after_inference'])} after inference, "
                     f"{_fmt(rss['max_rss_process'])} process maximum (includes the Python runtime, "
                     "libraries and the allocator's cache)")
    return "\n".join(lines)


def plot_measured(report: dict, path: str) -> None:
    """Stacked bars by category: inference and each optimizer's step, rank 0."""
    r = report["ranks"][0]
    bars = {"inference": r["inference"]["breakdown"]}
    bars.update({f"{n} step": o["zo_step"]["breakdown"] for n, o in r["optimizers"].items()})
    title = f"{report['model']}, {report['backend']} x{report['world_size']}, rank 0 (measured)"
    _stacked_bars({"": bars}, title, path, unit=(1 << 20), unit_name="MiB")


# ------------------------------------------------------------------------------------------ simulated


def simulate_reports(args) -> list[dict]:
    from zofsdp.measure.simulate import simulate

    optimizers = None if args.optimizers in ("", "all") else _optimizer_names(args.optimizers, "mezo")
    seq_len = args.seq_len or 256
    reports = []
    for model in args.model:
        for ws in args.world_size:
            result = simulate(model, ws, args.dtype, seq_len, args.batch_size, optimizers,
                              compute_dtype=args.compute_dtype)
            report = simulated_report(result, model, ws, args.dtype, seq_len, args.batch_size)
            report["compute_dtype"] = args.compute_dtype or args.dtype
            reports.append(report)
    return reports


def load_estimate(model_json: str, world_size: int, dtype: str) -> dict:
    from zofsdp.loading import load_estimate as estimate
    from zofsdp.measure.simulate import DTYPES

    return estimate(model_json, world_size, DTYPES[dtype])


def simulated_report(result: dict, model: str, ws: int, dtype: str, seq_len: int, batch_size: int) -> dict:
    from zofsdp.measure.simulate import DTYPES, LEFT_OUT, adamw_full_finetune, hand_inference, zero3_zo

    stats, rows = result["stats"], result["rows_per_rank"]
    bytes_per = torch.finfo(DTYPES[dtype]).bits // 8
    inference = result["inference"]
    opts = {n: _optimizer_dict(m, inference.total) for n, m in result["optimizers"].items()}
    first = next(iter(opts))
    return {
        "mode": "simulated", "model": Path(model).stem, "model_config": str(model), "world_size": ws,
        "dtype": dtype, "seq_len": seq_len, "batch_size": batch_size, "rows_per_rank": rows,
        "backend": "fsdp2" if ws > 1 else "none", "params": stats["params"],
        "per_rank_peak_bytes": {"inference": inference.total, "zo_step": opts[first]["zo_step"]["total"]},
        "ratio": opts[first]["ratio"], "optimizer": first,
        "breakdown": {"inference": inference.breakdown, "zo_step": opts[first]["zo_step"]["breakdown"]},
        "optimizers": opts,
        "hand_calculation": hand_inference(stats, ws, bytes_per, rows, seq_len),
        "adamw_full_finetune_analytic": adamw_full_finetune(stats, ws, rows, seq_len),
        "zero3_zo_step_analytic": zero3_zo(stats, ws, bytes_per, inference.breakdown["activations"]),
        "left_out": LEFT_OUT,
        "host_load_estimate": load_estimate(model, ws, dtype),
    }


def simulated_table(reports: list[dict]) -> str:
    first = reports[0]
    lines = [(f"Simulated per-rank peak (rank 0), {first['dtype']} shards, {first['compute_dtype']} compute, "
              f"{first['batch_size']} x {first['seq_len']} tokens; GiB. AdamW and ZeRO-3 columns are analytic."),
             "| model | ranks | inference | " + " | ".join(f"{n} step" for n in first["optimizers"])
             + " | ratio | hand calc | ZeRO-3 ZO (analytic) | AdamW full FT (analytic) |",
             "|---|---|---|" + "---|" * len(first["optimizers"]) + "---|---|---|---|"]
    for r in reports:
        steps = " | ".join(f"{o['zo_step']['total'] / GIB:.2f}" for o in r["optimizers"].values())
        ratio = max(o["ratio"] for o in r["optimizers"].values())
        lines.append(f"| {r['model']} | {r['world_size']} | {r['per_rank_peak_bytes']['inference'] / GIB:.2f} | "
                     f"{steps} | {ratio:.4f} | {r['hand_calculation']['total'] / GIB:.2f} | "
                     f"{r['zero3_zo_step_analytic']['total'] / GIB:.2f} | "
                     f"{r['adamw_full_finetune_analytic']['total'] / GIB:.1f} |")
    lines.append(f"Left out of the simulation: {first['left_out']}.")
    lines.append("Host memory per rank while loading (estimate, zofsdp.loading.load_estimate): "
                 + "; ".join(f"{r['model']}/{r['world_size']}: lean "
                             f"{r['host_load_estimate']['lean_gpu'] / GIB:.2f} GiB on GPU runs "
                             f"({r['host_load_estimate']['lean_cpu'] / GIB:.2f} on CPU), plain from_pretrained "
                             f"{r['host_load_estimate']['plain'] / GIB:.1f}" for r in reports))
    return "\n".join(lines)


def plot_simulated(reports: list[dict], path: str) -> None:
    """One panel per model; per world size: inference, ZO step(s) (stacked by category), AdamW (analytic)."""
    panels: dict[str, dict] = {}
    for r in reports:
        bars = panels.setdefault(r["model"], {})
        bars[f"{r['world_size']}: inference"] = r["breakdown"]["inference"]
        for name, o in r["optimizers"].items():
            bars[f"{r['world_size']}: {name}"] = o["zo_step"]["breakdown"]
        bars[f"{r['world_size']}: AdamW*"] = {"adamw (analytic)": r["adamw_full_finetune_analytic"]["total"]}
    title = (f"Per-rank peak memory, simulated ({reports[0]['dtype']}, {reports[0]['batch_size']} x "
             f"{reports[0]['seq_len']} tokens); bar labels = ranks: what; * analytic")
    _stacked_bars(panels, title, path, unit=GIB, unit_name="GiB", clip=True)


def _stacked_bars(panels: dict[str, dict[str, dict[str, int]]], title: str, path: str, unit: int,
                  unit_name: str, clip: bool = False) -> None:
    """Stacked bars per panel; with `clip`, the y axis fits the ZO bars and taller bars are labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = [*CATEGORIES, "adamw (analytic)"]
    colors = dict(zip(categories, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.45 * max(map(len, panels.values())) + 2),
                                                      3.2 * len(panels)), squeeze=False)
    for ax, (name, bars) in zip(axes[:, 0], panels.items()):
        labels = list(bars)
        bottom = [0.0] * len(labels)
        for cat in categories:
            values = [bars[label].get(cat, 0) / unit for label in labels]
            if any(values):
                ax.bar(labels, values, bottom=bottom, color=colors[cat], label=cat.replace("_", " "))
                bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel(unit_name)
        if clip:
            top = 1.3 * max(sum(v for k, v in b.items() if k in CATEGORIES) for b in bars.values()) / unit
            ax.set_ylim(0, top)
            for i, height in enumerate(bottom):
                if height > top:
                    ax.text(i, top * 0.97, f"{height:.0f}", ha="center", va="top", fontsize=6, rotation=90)
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
