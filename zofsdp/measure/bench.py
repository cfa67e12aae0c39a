"""`zofsdp bench`: where a ZO step's time goes, what crosses the wire, how fast each method converges.

Sections (each runs alone with `--sections NAME ...`):
  overhead     median ZO-step time / time of the same number of forwards, same model and batch, per
               registered optimizer, beside a reference MeZO step written the way the paper's code is.
  noise        elements/s of our generate-and-apply pass (gaussian, table) vs a plain copy of the same
               bytes and vs torch's `normal_` + `add_` over a full-size z.
  comm         bytes per step per rank, the forward's parameter gathers apart from everything else
               (2 processes under torchrun; see zofsdp.measure.dist).
  convergence  eval accuracy vs forward passes and vs wall time per optimizer, same seeds
               (see zofsdp.measure.convergence).
  scaling      per-rank throughput at 1 and 2 ranks per sharded backend.
  launches     noise chunk operations vs fused kernel launches per pass and per step, OPT-30B on 8 ranks
               from the shard layout (see zofsdp.measure.launches).
  protocol     paired-seed speedups over MeZO with bootstrap CIs, a placebo arm, resumable (not in the
               default set: hours; see zofsdp.measure.protocol).
  landscape    per tensor and layer: gradient energy, minibatch noise, Hessian and Fisher traces (autograd),
               and the best per-step ratio to dense MeZO any block sampler could reach (not in the default
               set: ~10 min of one core, 8 GiB; see zofsdp.measure.landscape).

Timings are compared side by side in one process: every repetition times each contender once, in turn,
and the figures are medians over repetitions, so slow drifts of a shared machine hit all of them alike.
`--quick` uses the tiny random model and few repetitions (seconds to minutes; CI runs it).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from zofsdp.measure.common import (
    ONE_THREAD_SUFFIX,
    TABLE_SUFFIX,
    _load_average,
    machine,
    median,
    run_config,
    timed2,
    wanted,
)

SECTIONS = ("overhead", "noise", "comm", "convergence", "scaling", "launches")
EXTRA_SECTIONS = ("protocol", "landscape")  # run only when named
REFERENCE = "mezo_reference"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zofsdp bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--markdown", help="write the markdown tables to this file (default: stdout only)")
    p.add_argument("--plot", help="write PNG plots (bench_*.png) into this folder")
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions (CI smoke)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS + EXTRA_SECTIONS, default=list(SECTIONS))
    p.add_argument("--model", help="model.name_or_path (default: tiny-llama quick, smollm2-135m full)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, help="timed repetitions (default 3 quick, 7 full)")
    p.add_argument("--steps", type=int, help="convergence: training steps (default 6 quick, 100 full)")
    p.add_argument("--target", type=float, help="convergence: target accuracy (default 0.65)")
    p.add_argument("--optimizers", nargs="+", help="only these (names in OPTIMIZERS, mezo:table, mezo:1thread)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default="runs/bench", help="folder for convergence runs and worker files")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set when started by torchrun (bench_dist)
    from zofsdp.measure.protocol import add_arguments

    add_arguments(p)
    return p


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    args.model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    args.reps = args.reps or (3 if args.quick else 7)
    args.steps = args.steps or (6 if args.quick else 100)
    args.target = 0.65 if args.target is None else args.target
    return args


def main(argv: list[str] | None = None) -> int:
    args = defaults(parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        from zofsdp.measure.dist import worker

        return worker(args)
    results = {"machine": machine(), "quick": args.quick, "model": args.model, "batch_size": args.batch_size}
    for name in args.sections:
        start = time.perf_counter()
        results.update(SECTION_RUNNERS[name](args))
        print(f"[bench] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    results["machine"]["load_average_after"] = _load_average()
    table = markdown(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        from zofsdp.measure.convergence import plot

        for path in plot(results, Path(args.plot)):
            print(f"[bench] wrote {path}", file=sys.stderr)
        if "landscape" in results:
            from zofsdp.measure.landscape import plot as plot_landscape

            print(f"[bench] wrote {plot_landscape(results, Path(args.plot))[0]}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- overhead


class ReferenceMeZO:
    """MeZO's step the way the paper's code (princeton-nlp/MeZO, `zo_step`/`zo_update`) does it:
    z drawn from the global RNG reseeded with one per-step seed, a fresh `torch.normal` of each parameter's
    shape for every use, and `p.data = p.data + …` (a new full-size tensor each time). Four noise passes:
    +εz, −2εz, +εz (restore), and the update θ ← θ − η(g·z + λθ). Only for timing."""

    def __init__(self, model: torch.nn.Module, eps: float, lr: float, weight_decay: float = 0.0):
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters()]
        self.eps, self.lr, self.weight_decay = eps, lr, weight_decay

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for _, p in self.params:
            z = torch.normal(mean=0.0, std=1.0, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * self.eps

    def step(self, loss_fn, step: int) -> dict:
        seed = step * 1000003 + 17
        self._perturb(seed, +1)
        loss_plus = loss_fn()
        self._perturb(seed, -2)
        loss_minus = loss_fn()
        grad = (loss_plus - loss_minus) / (2 * self.eps)
        self._perturb(seed, +1)
        torch.manual_seed(seed)
        for name, p in self.params:
            z = torch.normal(mean=0.0, std=1.0, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            if "bias" in name or "norm" in name:
                p.data = p.data - self.lr * grad * z
            else:
                p.data = p.data - self.lr * (grad * z + self.weight_decay * p.data)
        return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": grad, "forward_passes": 2}


def contenders(cfg, session) -> dict:
    """name -> object with `.step(loss_fn, step)`: each registered optimizer, MeZO on the noise table and
    on one noise thread, and the reference MeZO step (on its own copy of the model: it replaces `p.data`, which would leave
    our shards pointing at dead storage)."""
    from zofsdp.optim import OPTIMIZERS, build_optimizer, param_shapes

    backend = session.backend
    out = {}
    for name in OPTIMIZERS:
        out[name] = build_optimizer(replace(cfg.zo, optimizer=name), backend.shards(), 0, backend.device,
                                    all_reduce=backend.all_reduce_sum, shapes=param_shapes(backend))
    if "mezo" in OPTIMIZERS:
        table = replace(cfg.zo, optimizer="mezo", noise="table")
        out["mezo" + TABLE_SUFFIX] = build_optimizer(table, backend.shards(), 0, backend.device)
        one = replace(cfg.zo, optimizer="mezo", noise_threads=1)
        out["mezo" + ONE_THREAD_SUFFIX] = build_optimizer(one, backend.shards(), 0, backend.device)
    out[REFERENCE] = ReferenceMeZO(copy.deepcopy(session.model), cfg.zo.eps, cfg.zo.lr, cfg.zo.weight_decay)
    return out


def section_overhead(args: argparse.Namespace) -> dict:
    from zofsdp.scoring import encode
    from zofsdp.train import global_loss, setup

    cfg = run_config(args, "parallel.backend=none", "zo.lr=1e-6")
    session = setup(cfg)
    batch = encode(session.tokenizer, session.splits.train[: args.batch_size], cfg.model.max_length)
    players = {k: v for k, v in contenders(cfg, session).items() if wanted(args, k) or k == REFERENCE}

    def forward_of(model):
        target = copy.copy(session)
        target.model = model
        return lambda: global_loss(target, batch)[0]

    forward = forward_of(session.model)
    losses = {name: forward_of(getattr(p, "model", session.model)) for name, p in players.items()}
    forward_s, forward_cpu, passes, errors = [], [], {}, {}
    step_s, step_cpu = {name: [] for name in players}, {name: [] for name in players}
    with torch.no_grad():
        for rep in range(args.reps + 1):  # repetition 0 warms up (allocator, lazy init) and is dropped
            t_fwd, c_fwd, _ = timed2(forward)
            for name, player in list(players.items()):
                try:
                    t_step, c_step, record = timed2(lambda: player.step(losses[name], rep + 1))
                except Exception as err:  # an optimizer under construction must not sink the others
                    errors[name] = f"{type(err).__name__}: {err}"
                    print(f"[bench] overhead: {name} failed: {errors[name]}", file=sys.stderr)
                    del players[name], step_s[name], step_cpu[name]
                    continue
                passes[name] = record["forward_passes"]
                if rep:
                    step_s[name].append(t_step)
                    step_cpu[name].append(c_step)
            if rep:
                forward_s.append(t_fwd)
                forward_cpu.append(c_fwd)
    session.backend.close()
    fwd, fwd_cpu = median(forward_s), median(forward_cpu)
    ratios = {name: median(times) / (passes[name] * fwd) for name, times in step_s.items()}
    ratios_cpu = {name: median(times) / (passes[name] * fwd_cpu) for name, times in step_cpu.items()}
    return {"step_overhead": ratios, "step_overhead_cpu": ratios_cpu,
            "step_overhead_detail": {
                "forward_s": fwd, "forward_s_all": forward_s, "forward_cpu_s": fwd_cpu,
                "step_cpu_s": {name: median(t) for name, t in step_cpu.items()}, "tokens": batch.num_tokens,
                "seq_len": int(batch.input_ids.shape[1]),
                "params": sum(s.numel for s in session.backend.shards()),
                "step_s": {name: median(t) for name, t in step_s.items()},
                "forward_passes": passes, "reps": args.reps, "errors": errors}}


# ---------------------------------------------------------------------------------------------- noise


def section_noise(args: argparse.Namespace) -> dict:
    """Elements/s of each way to put `scale * z` into a flat fp32 tensor of n elements."""
    from zofsdp.noise import Noise, Shard, default_threads

    n = (1 << 20) if args.quick else (1 << 24)
    data = torch.zeros(n)
    source = torch.randn(n)
    z_full = torch.empty(n)
    shard = Shard("bench.weight", data, 0, n, 1, True, "layers.0")
    lanes = default_threads("cpu")
    gaussian, table = Noise(0, kind="gaussian", threads=lanes), Noise(0, kind="table", threads=lanes)
    gaussian_1 = Noise(0, kind="gaussian")
    philox = Noise(0, kind="philox", threads=lanes)  # the torch reference: the CPU path of zo.noise=philox
    generator = torch.Generator().manual_seed(0)

    def randn_add():
        z_full.normal_(generator=generator)
        data.add_(z_full, alpha=1e-3)

    cases = {
        "copy": lambda: data.copy_(source),
        "randn_add": randn_add,
        "ours_gaussian_1_thread": lambda: gaussian_1.add_([shard], (1, 0), 1e-3),
        "ours_gaussian": lambda: gaussian.add_([shard], (1, 0), 1e-3),
        "ours_table": lambda: table.add_([shard], (1, 0), 1e-3),
        "ours_philox": lambda: philox.add_([shard], (1, 0), 1e-3),
    }
    times, cpu = {name: [] for name in cases}, {name: [] for name in cases}
    for rep in range(args.reps + 1):
        for name, fn in cases.items():
            t, c, _ = timed2(fn)
            if rep:
                times[name].append(t)
                cpu[name].append(c)
    rates = {name: n / median(t) for name, t in times.items()}
    return {"noise_elements_per_s": rates, "noise_detail": {
        "numel": n, "noise_threads": lanes, "ns_per_element": {k: 1e9 / v for k, v in rates.items()},
        "cpu_ns_per_element": {k: 1e9 * median(c) / n for k, c in cpu.items()},
        "vs_copy": {k: v / rates["copy"] for k, v in rates.items()}},
        "noise_quality": noise_quality(args)}


def noise_quality(args: argparse.Namespace) -> dict:
    """Does the table's correlated noise hurt the estimator? MeZO (our optimizer) on a least-squares
    problem of low effective rank, f(θ) = ½|Aθ − b|² with A of rank 16 (fine-tuning's loss has a low
    effective rank too, which is why ZO works at all), with zo.noise = gaussian vs table, same seeds.
    The table holds 1/8 of the parameters, as the default 16M-element table does for a 135M model, so its
    slices overlap heavily. Reported: f after the steps / f at the start, per seed."""
    from zofsdp.config import ZOConfig
    from zofsdp.noise import Shard
    from zofsdp.optim.mezo import MeZO

    d, steps, seeds = ((1 << 16), 40, (0, 1)) if args.quick else ((1 << 20), 150, (0, 1, 2))
    rank, chunk = 16, 1 << 10
    out = {}
    for kind in ("gaussian", "table"):
        ratios = []
        for seed in seeds:
            g = torch.Generator().manual_seed(1000 + seed)
            a, b = torch.randn(rank, d, generator=g) / d**0.5, torch.randn(rank, generator=g)
            theta = torch.zeros(d)
            shard = Shard("theta", theta, 0, d, 1, False, "layers.0")

            def loss_fn() -> float:
                return 0.5 * float(((a @ theta).double() - b.double()).square().sum())

            cfg = ZOConfig(lr=1.0 / (rank + 2), eps=1e-3, noise=kind, chunk_numel=chunk, table_numel=d // 8)
            optimizer = MeZO([shard], cfg, seed)
            start = loss_fn()
            for step in range(1, steps + 1):
                optimizer.step(loss_fn, step)
            ratios.append(loss_fn() / start)
        out[kind] = {"final_over_start": ratios, "mean": statistics.fmean(ratios)}
    return {"dimension": d, "rank": rank, "steps": steps, "table_numel": d // 8, **out}


# ---------------------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} with "
             f"{m['torch_threads']} threads, load average {m['load_average_before']} -> "
             f"{m.get('load_average_after')}; model {results['model']}, batch {results['batch_size']}.", ""]
    if "step_overhead" in results:
        d = results["step_overhead_detail"]
        lines += [f"Step overhead (forward {d['forward_s']:.3f} s median, {d['tokens']} tokens, "
                  f"{d['params']:,} parameters; floor 1.0):", "",
                  "| optimizer | step s | forwards | step / forwards (wall) | (CPU time) |",
                  "|---|---|---|---|---|"]
        for name, ratio in results["step_overhead"].items():
            lines.append(f"| {name} | {d['step_s'][name]:.3f} | {d['forward_passes'][name]} | {ratio:.2f} | "
                         f"{results['step_overhead_cpu'][name]:.2f} |")
        lines.append("")
    if "noise_elements_per_s" in results:
        d = results["noise_detail"]
        lines += [f"Noise pass over {d['numel']:,} fp32 elements ({d['noise_threads']} noise threads unless named):", "",
                  "| pass | elements/s | ns/element | vs copy | CPU ns/element |", "|---|---|---|---|---|"]
        for name, rate in results["noise_elements_per_s"].items():
            lines.append(f"| {name} | {rate:.3g} | {d['ns_per_element'][name]:.2f} | "
                         f"{d['vs_copy'][name]:.2f} | "
                         f"{d['cpu_ns_per_element'][name]:.2f} |")
        q = results["noise_quality"]
        lines += ["", f"MeZO on a rank-{q['rank']} least-squares problem, {q['dimension']:,} parameters, "
                  f"{q['steps']} steps, table of {q['table_numel']:,} (loss after / before, per seed):", "",
                  "| noise | per seed | mean |", "|---|---|---|"]
        for kind in ("gaussian", "table"):
            per_seed = ", ".join(f"{r:.4f}" for r in q[kind]["final_over_start"])
            lines.append(f"| {kind} | {per_seed} | {q[kind]['mean']:.4f} |")
        lines.append("")
    if "comm_bytes_per_step" in results:
        lines += ["Bytes per step per rank (2 ranks):", "",
                  "| backend | optimizer | forward gathers | everything else | other calls |",
                  "|---|---|---|---|---|"]
        for backend, per in results["comm_bytes_per_step"].items():
            for name, b in per.items():
                if "error" in b:
                    lines.append(f"| {backend} | {name} | error: {b['error'].splitlines()[-1][:80]} | | |")
                else:
                    lines.append(f"| {backend} | {name} | {b['forward_gathers']:,.0f} | {b['other']:,.0f} | "
                                 f"{b['other_calls']:.0f} |")
        lines.append("")
    if "launches" in results:
        from zofsdp.measure.launches import markdown_rows as launch_rows

        lines += launch_rows(results)
    if "convergence" in results:
        from zofsdp.measure.convergence import markdown_rows

        lines += markdown_rows(results)
    if "protocol" in results:
        lines.append(results["protocol"]["table"])
    if "landscape" in results:
        from zofsdp.measure.landscape import markdown_rows as landscape_rows

        lines += landscape_rows(results)
    if "scaling" in results:
        lines += ["Scaling (MeZO steps, global batch split over ranks):", "",
                  "| backend | ranks | step s | examples/s | examples/s per rank |", "|---|---|---|---|---|"]
        for backend, per in results["scaling"].items():
            for ranks, s in per.items():
                if "error" in s:
                    lines.append(f"| {backend} | {ranks} | error: {s['error'].splitlines()[-1][:80]} | | |")
                else:
                    lines.append(f"| {backend} | {ranks} | {s['step_s']:.3f} | {s['examples_per_s']:.2f} | "
                                 f"{s['examples_per_s_per_rank']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _comm(args):
    from zofsdp.measure.dist import section_comm

    return section_comm(args)


def _scaling(args):
    from zofsdp.measure.dist import section_scaling

    return section_scaling(args)


def _launches(args):
    from zofsdp.measure.launches import section_launches

    return section_launches(args)


def _protocol(args):
    from zofsdp.measure.protocol import section_protocol

    return section_protocol(args)


def _landscape(args):
    from zofsdp.measure.landscape import section_landscape

    return section_landscape(args)


def _convergence(args):
    from zofsdp.measure.convergence import section_convergence

    return section_convergence(args)


SECTION_RUNNERS = {"overhead": section_overhead, "noise": section_noise, "comm": _comm,
                   "convergence": _convergence, "scaling": _scaling, "launches": _launches, "protocol": _protocol,
                   "landscape": _landscape}
