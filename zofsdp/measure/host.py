"""Host (CPU) memory of this process while something runs: the peak of anonymous resident memory.

Why RssAnon sampled by a thread, and not something else:
- PyTorch's memory trackers (and tracemalloc) count only the allocations they see: torch storages (or Python
  objects). safetensors' buffers, the allocator's kept-but-free pages and library state escape them. RSS
  counts everything the process really holds.
- Linux keeps a high-water mark only for the whole RSS (VmHWM), which includes file-backed pages: a
  memory-mapped checkpoint shows up there although those pages are the shared, reclaimable page cache (one
  copy per node, whatever the number of ranks). RssAnon excludes them, but has no high-water mark, so a
  thread samples it every `period` seconds. The result is a lower bound of the true peak by whatever is
  allocated and freed between two samples (1 ms here; a tensor of tens of MiB takes longer than that to fill).
VmHWM is reported beside it (reset at the start through /proc/self/clear_refs where allowed).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MIB = 1 << 20


def proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (empty off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


@dataclass
class HostPeak:
    """Filled by `host_peak()`: bytes above the anonymous memory held when the block started."""

    baseline_anon: int = 0
    peak_anon: int = 0
    end_anon: int = 0
    peak_rss_incl_files: int = 0
    seconds: float = 0.0

    @property
    def peak_above_baseline(self) -> int:
        return max(self.peak_anon - self.baseline_anon, 0)

    def as_dict(self) -> dict:
        return {"peak_anon_above_baseline": self.peak_above_baseline, "baseline_anon": self.baseline_anon,
                "peak_anon": self.peak_anon, "anon_after": self.end_anon,
                "peak_rss_incl_file_pages": self.peak_rss_incl_files, "seconds": self.seconds,
                "method": "RssAnon sampled every 1 ms (/proc/self/status); VmHWM for peak_rss_incl_file_pages"}


class host_peak:
    """`with host_peak() as peak: ...` then `peak.peak_above_baseline` (bytes)."""

    def __init__(self, period: float = 1e-3) -> None:
        self.period = period
        self.result = HostPeak()
        self._stop = threading.Event()

    def __enter__(self) -> HostPeak:
        import gc

        gc.collect()  # garbage from before the block is not the block's
        _reset_hwm()
        now = proc_status().get("RssAnon", 0)
        self.result.baseline_anon = self.result.peak_anon = now
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="host-peak")
        self._thread.start()
        return self.result

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.result.peak_anon = max(self.result.peak_anon, proc_status().get("RssAnon", 0))
            time.sleep(self.period)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        status = proc_status()
        self.result.end_anon = status.get("RssAnon", 0)
        self.result.peak_anon = max(self.result.peak_anon, self.result.end_anon)
        self.result.peak_rss_incl_files = status.get("VmHWM", 0)
        self.result.seconds = time.perf_counter() - self._start


def _reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
