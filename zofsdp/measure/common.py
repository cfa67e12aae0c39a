"""Helpers shared by the `zofsdp bench` sections (bench, dist, convergence)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

TABLE_SUFFIX = ":table"
"""`mezo:table` = MeZO with zo.noise=table (the cheaper noise), timed beside the default."""
ONE_THREAD_SUFFIX = ":1thread"
"""`mezo:1thread` = MeZO with zo.noise_threads=1: what the default's noise threads gain."""


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "load_average_before": _load_average()}


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def wanted(args: argparse.Namespace, name: str) -> bool:
    return not args.optimizers or name in args.optimizers


def run_config(args: argparse.Namespace, *overrides: str):
    from zofsdp.config import load_config

    return load_config(None, [f"model.name_or_path={args.model}", f"train.batch_size={args.batch_size}",
                              f"data.num_train={args.batch_size}", "data.num_dev=0", "data.num_eval=0",
                              "train.save_model=false", *overrides])


def timed2(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result). On a shared machine the CPU time is the
    cross-check that descheduling cannot inflate (with one thread; more threads add spin-waiting)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def median(values: list[float]) -> float:
    return statistics.median(values)
