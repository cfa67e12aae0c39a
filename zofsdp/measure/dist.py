"""Multi-process parts of `zofsdp bench`: communication per step and per-rank throughput.

The parent spawns `torchrun --standalone --nproc_per_node=N -m zofsdp bench --worker SPEC`; every rank
counts its own collectives and writes `SPEC.file.<rank>.json`, and the parent keeps, for each figure, the
largest value over ranks.

Counting: every `torch.distributed` collective is wrapped before the backend starts (DeepSpeed keeps a
reference to `all_gather_into_tensor` from its own init, so wrapping must come first). A call counts the
bytes of the largest tensor buffer this rank hands to it (an all-gather's output, an all-reduce's tensor):
the message size, not what a ring algorithm moves on the wire (2(n-1)/n of it for an all-reduce). A
gather issued while the model's forward runs is a "forward gather" (the parameter all-gathers that any
sharded inference pays); everything else — the scalar losses, any optimizer traffic — is "other".
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
    "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "_reduce_scatter_base", "broadcast", "broadcast_object_list", "reduce", "all_to_all",
    "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv",
)


def sharded_backends() -> list[str]:
    """fsdp2, plus deepspeed when its backend module and the package are installed."""
    names = ["fsdp2"]
    if importlib.util.find_spec("zofsdp.parallel.deepspeed") and importlib.util.find_spec("deepspeed"):
        names.append("deepspeed")
    return names


# ---------------------------------------------------------------------------------------------- counting


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class CommCounter:
    """Wraps the torch.distributed collectives; bytes and calls per category since the last reset."""

    def __init__(self) -> None:
        self.in_forward = 0
        self._depth = 0  # a collective implemented through another one counts once
        self.reset()

    def reset(self) -> None:
        self.bytes = {"forward_gathers": 0, "other": 0}
        self.calls = {"forward_gathers": 0, "other": 0}
        self.by_op: dict[str, int] = {}

    def install(self) -> None:
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            if self._depth == 0:
                size = max([_tensor_bytes(a) for a in (*args, *kwargs.values())] + [0])
                kind = "forward_gathers" if self.in_forward and "gather" in name else "other"
                self.bytes[kind] += size
                self.calls[kind] += 1
                self.by_op[name] = self.by_op.get(name, 0) + size
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def watch(self, model: torch.nn.Module) -> None:
        """Mark the model's forward; the pre-hook goes first, before the sharding hooks gather."""

        def enter(*_):
            self.in_forward += 1

        def leave(*_):
            self.in_forward -= 1

        model.register_forward_pre_hook(enter, prepend=True)
        model.register_forward_hook(leave, always_call=True)


# ---------------------------------------------------------------------------------------------- worker


def worker(args) -> int:
    """One rank: time and count `reps` steps of each optimizer in the spec, after one warm-up step."""
    import time

    from zofsdp.measure.common import median, run_config
    from zofsdp.optim import build_optimizer, param_shapes
    from zofsdp.scoring import encode
    from zofsdp.train import global_loss, setup

    spec = json.loads(args.worker)
    counter = CommCounter()
    counter.install()
    cfg = run_config(args, f"parallel.backend={spec['backend']}", "zo.lr=1e-6")
    session = setup(cfg)
    counter.watch(session.model)
    batch = encode(session.tokenizer, session.splits.train[: args.batch_size], cfg.model.max_length)
    backend = session.backend

    def loss_fn() -> float:
        return global_loss(session, batch)[0]

    out = {"rank": backend.rank, "world_size": backend.world_size, "tokens": batch.num_tokens}
    with torch.no_grad():
        loss_fn()
        counter.reset()
        start = time.perf_counter()
        loss_fn()
        out["forward"] = {"s": time.perf_counter() - start, **counter.bytes,
                          "other_calls": counter.calls["other"]}
        for name in spec["optimizers"]:
            optimizer = build_optimizer(replace(cfg.zo, optimizer=name), backend.shards(), 0, backend.device,
                                        all_reduce=backend.all_reduce_sum, shapes=param_shapes(backend))
            optimizer.step(loss_fn, 1)
            counter.reset()
            times = []
            for step in range(2, args.reps + 2):
                start = time.perf_counter()
                record = optimizer.step(loss_fn, step)
                times.append(time.perf_counter() - start)
            per_step = {k: v / args.reps for k, v in counter.bytes.items()}
            out[name] = {**per_step, "other_calls": counter.calls["other"] / args.reps,
                         "by_op": {k: v / args.reps for k, v in counter.by_op.items()},
                         "step_s": median(times), "forward_passes": record["forward_passes"]}
    Path(f"{spec['file']}.{backend.rank}.json").write_text(json.dumps(out))
    backend.close()
    return 0


def launch(args, backend: str, nproc: int, optimizers: list[str]) -> dict:
    """Run the worker under torchrun; per optimizer the max over ranks of every number."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{backend}-{nproc}-"))
    spec = {"backend": backend, "optimizers": optimizers, "file": str(folder / "rank")}
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "zofsdp", "bench", "--worker", json.dumps(spec), "--model", args.model,
           "--batch-size", str(args.batch_size), "--reps", str(args.reps), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:  # keep the ranks' own error lines: torchrun's summary says only "failed"
        lines = (proc.stderr or proc.stdout).splitlines()
        causes = [line for line in lines if line.startswith("[rank") and "Error" in line]
        return {"error": "\n".join(causes[-3:]) or "\n".join(lines[-20:])}
    ranks = [json.loads((folder / f"rank.{r}.json").read_text()) for r in range(nproc)]
    return {name: _max_over_ranks([r[name] for r in ranks]) for name in ["forward", *optimizers]} | {
        "tokens": ranks[0]["tokens"], "threads_per_rank": threads}


def _max_over_ranks(records: list[dict]) -> dict:
    out = {}
    for key, value in records[0].items():
        if isinstance(value, dict):
            out[key] = _max_over_ranks([r.get(key, {}) for r in records])
        else:
            out[key] = max(r.get(key, value) for r in records)
    return out


_RUNS: dict = {}


def _run(args, backend: str, nproc: int) -> dict:
    """Cached: the comm and scaling sections share the 2-rank run."""
    from zofsdp.optim import OPTIMIZERS

    key = (backend, nproc)
    if key not in _RUNS:
        _RUNS[key] = launch(args, backend, nproc, list(OPTIMIZERS))
    return _RUNS[key]


def section_comm(args) -> dict:
    from zofsdp.optim import OPTIMIZERS

    comm = {}
    for backend in sharded_backends():
        run = _run(args, backend, 2)
        if "error" in run:
            comm[backend] = {name: {"error": run["error"]} for name in OPTIMIZERS}
            continue
        comm[backend] = {name: {k: run[name][k] for k in ("forward_gathers", "other", "other_calls", "by_op")}
                         for name in OPTIMIZERS}
        comm[backend]["forward_only"] = {"forward_gathers": run["forward"]["forward_gathers"],
                                         "other": run["forward"]["other"],
                                         "other_calls": run["forward"]["other_calls"], "by_op": {}}
    return {"comm_bytes_per_step": comm}


def section_scaling(args) -> dict:
    scaling = {}
    for backend in sharded_backends():
        scaling[backend] = {}
        for nproc in (1, 2):
            run = _run(args, backend, nproc)
            if "error" in run:
                scaling[backend][str(nproc)] = {"error": run["error"]}
                continue
            step_s = run["mezo"]["step_s"]
            scaling[backend][str(nproc)] = {
                "step_s": step_s, "examples_per_s": args.batch_size / step_s,
                "examples_per_s_per_rank": args.batch_size / step_s / nproc,
                "tokens_per_s_per_rank": run["tokens"] * run["mezo"]["forward_passes"] / step_s / nproc,
                "threads_per_rank": run["threads_per_rank"]}
    return {"scaling": scaling}
