"""The seed log: a run stored as a few bytes per step, from which `zofsdp replay` rebuilds the weights.

A ZO step is a pure function of (seed, step, optimizer state, the losses its loss oracle returned): z comes
from the seed, CurvZO's masks and AdaLeZO's layer draws from the seed and a state that evolves only from
the projected gradients, and those from the losses. So logging, per step, the floats `loss_fn()` returned
(in call order, float64 bit for bit) is enough to run the optimizer again with an oracle that hands them
back: the same masks, the same skipped (non-finite) steps, the same updates, and no forward pass.

File `seedlog.bin` (rank 0 writes it beside metrics.jsonl; each checkpoint holds a copy up to its step):
  b"ZOSEEDLG", uint32 little-endian n, n bytes of JSON header (config, resolved noise kind, model shape),
  then one record per step: uint32 step, uint16 count, count × float64 (little-endian).
6 + 8 × (forwards per step) bytes: 22 for MeZO, CurvZO, AdaLeZO and ZO-Adam (2 forwards), 30 for BSZO
and HiZOO (3) and for CurvZO's ℓ₀ steps (every zo.curvzo.curvature_every: ℓ₀ is logged first, so its
curvature regression replays too), 38 for BSZO-B (4). DiZO's projection steps also hold its search's
2·search_iters losses and,
after them, one projection factor per projected tensor (`optim.base.decide`): 22 + 8·(20 + 60) = 662 bytes
every 50th step on SmolLM2-135M (30 layers × K, V) at the defaults.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"ZOSEEDLG"
FILE = "seedlog.bin"
_HEAD = struct.Struct("<IH")  # step, number of losses that follow


@dataclass(slots=True)
class Record:
    step: int
    losses: tuple[float, ...]


class SeedLogWriter:
    """Appends one record per step (flushed, like metrics.jsonl); a no-op when `path` is None (rank > 0)."""

    def __init__(self, path: Path | None, header: dict | None = None):
        """A new log with `header`, or (header None) the existing file at `path` continued."""
        self.file = None
        if path is None:
            return
        if header is not None:
            with open(path, "wb") as f:
                f.write(encode_header(header))
        self.file = open(path, "ab")  # noqa: SIM115 (open for the run's length; closed by close())

    def append(self, step: int, losses: list[float]) -> None:
        if self.file:
            self.file.write(_pack(step, losses))
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def header(cfg, noise_kind: str, signature: list) -> dict:
    """What replay needs besides the records: the config (seed, optimizer, lr, ...), the noise kind `auto`
    resolved to on the training device, and the model's shape (to refuse a wrong base model)."""
    from zofsdp.cli import versions
    from zofsdp.config import to_dict

    return {"format": 1, "config": to_dict(cfg), "noise_kind": noise_kind, "model": signature,
            "versions": versions(), "replayable_until": None}


def encode_header(header: dict) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + len(text).to_bytes(4, "little") + text


def read(path: Path | str) -> tuple[dict, list[Record]]:
    """(header, records) of a seed log; a torn last record (a crash mid-write) is dropped."""
    data = Path(path).read_bytes()
    if data[:8] != MAGIC:
        from zofsdp.errors import UserError

        raise UserError(f"{path} is not a zofsdp seed log (no {MAGIC!r} at its start)")
    size = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + size])
    return header, list(_records(data, 12 + size))


def _records(data: bytes, pos: int) -> Iterator[Record]:
    while pos + _HEAD.size <= len(data):
        step, count = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + 8 * count
        if end > len(data):
            return
        yield Record(step, struct.unpack_from(f"<{count}d", data, pos + _HEAD.size))
        pos = end


def stop_replay_at(path: Path, step: int, reason: str) -> None:
    """Mark the log as replayable only up to `step` (a resume changed the trajectory's config after it)."""
    header, records = read(path)
    if header.get("replayable_until") is None:
        header["replayable_until"] = step
        header["not_replayable_because"] = reason
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode_header(header))
        f.writelines(_pack(r.step, r.losses) for r in records)
    tmp.replace(path)


def _pack(step: int, losses) -> bytes:
    return _HEAD.pack(step, len(losses)) + struct.pack(f"<{len(losses)}d", *losses)


def copy(src: Path, dst: Path) -> None:
    if src.is_file():
        shutil.copyfile(src, dst)
