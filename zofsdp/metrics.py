"""Rank-0 logging and the metrics file: one `log(dict)` that writes a JSON line (flushed at once)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, so a multi-rank run prints one stream."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # datasets logs a traceback for a file it cannot parse; zofsdp.tasks turns that into one clear error.
    logging.getLogger("datasets").setLevel(logging.CRITICAL)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a skipped step logs null and `skipped: true`
    return value


class MetricsLog:
    """Appends JSON objects to `metrics.jsonl`; a no-op on ranks other than 0."""

    def __init__(self, path: Path | str | None):
        self.file = open(path, "a") if path else None

    def log(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self.file.flush()  # a crash loses nothing that was logged

    def close(self) -> None:
        if self.file:
            self.file.close()


def read_metrics(path: Path | str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ForwardTimer:
    """Time spent in forwards: host time on CPU; on a GPU, CUDA events read after the step (reading them
    at once would add the very sync that PendingLoss avoids)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    def __enter__(self):
        start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            start.record()
        self.spans.append([start, None])

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.spans[-1][1] = end

    def seconds(self) -> float:
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1000  # elapsed_time waits for b
        return sum(b - a for a, b in self.spans)
