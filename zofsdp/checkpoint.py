"""Sharded checkpoints: every rank writes its own shards; any world size and backend reads them back.

Layout of `output_dir/checkpoints/step_00000042/` (docs/checkpointing.md has the details and the reasons):
  shards-00000-of-00002.safetensors   rank r's flat shards, one 1-D tensor per parameter it owns rows of;
                                      the metadata maps each to (global flat start, full numel)
  optimizer.json                      the optimizer's small state (CurvZO scores and budget, AdaLeZO rewards)
  config.yaml, metrics.jsonl, seedlog.bin   the run's config and logs up to this step
  manifest.json                       written last: step, files, model shape, data position, totals

Nothing here unpickles: safetensors and JSON only. A checkpoint is assembled in `.tmp-step_*`, every file
fsynced, and renamed to `step_*` by rank 0 once the manifest is in: a reader never sees half of one.

Resuming, each rank reads, for every shard it owns in the new layout, the overlapping slices from
whichever files hold them (`safe_open(...).get_slice`): the saved and the new layouts need not match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import torch

from zofsdp import seedlog
from zofsdp.config import save_config, to_dict
from zofsdp.errors import UserError

log = logging.getLogger("zofsdp")

FORMAT = "zofsdp-checkpoint/1"
ROOT = "checkpoints"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Config keys that do not change which weights a step produces: changing them on resume is silent.
HARMLESS = ("train.steps", "train.output_dir", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
            "train.eval_every", "train.eval_steps", "train.eval_batch_size", "train.save_model", "train.save_dtype",
            "train.log_every", "train.dump_state_every", "train.overwrite", "data.num_eval", "data.num_dev", "data.eval_split",
            "zo.noise_threads", "model.cache_dir", "parallel.")


class CheckpointError(UserError):
    """A checkpoint that cannot be used here; the message says why (the CLI prints it as one line)."""


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer state to go on exactly where it stopped."""

    step: int = 0
    totals: dict = field(default_factory=lambda: {"forward_passes": 0, "tokens": 0, "wall_s": 0.0,
                                                  "forward_s": 0.0, "skipped_steps": 0})
    skips_in_a_row: int = 0
    last_eval: dict = field(default_factory=dict)


class Preempted(SystemExit):
    """Raised after the checkpoint a signal asked for; exits with 128 + the signal (143 for SIGTERM)."""


# ------------------------------------------------------------------------------------------------ signals


class StopSignal:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits.

    Ranks may receive the signal at different moments, so `requested` all-reduces the flag once per step:
    every rank stops after the same step."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, backend) -> bool:
        flag = torch.tensor([1.0 if self.signum else 0.0], dtype=torch.float64, device=backend.device)
        return bool(backend.all_reduce_sum(flag).item())

    def exit(self, step: int, path: Path) -> Preempted:
        signum = self.signum or signal.SIGTERM
        log.warning("stopping after step %d on %s; resume from %s", step, signal.Signals(signum).name, path)
        return Preempted(128 + signum)


# ------------------------------------------------------------------------------------------------- saving


def due(cfg, step: int) -> bool:
    """A periodic checkpoint after this step (the last step's is written after the final evaluation)."""
    every = cfg.train.checkpoint_every
    return bool(every) and step % every == 0 and step < cfg.train.steps


def save(session, optimizer, state: TrainerState) -> Path:
    """Write the checkpoint of `state.step` (a collective); returns its folder once it is published."""
    backend, out = session.backend, Path(session.cfg.train.output_dir)
    root = out / ROOT
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    start = time.perf_counter()
    if backend.rank == 0:
        _remove_partial(root)
        tmp.mkdir(parents=True)
    backend.barrier()
    file = f"shards-{backend.rank:05d}-of-{backend.world_size:05d}.safetensors"
    nbytes = write_shards(tmp / file, backend.local_params() + state_shards(optimizer))
    timing = torch.zeros(2, backend.world_size, dtype=torch.float64, device=backend.device)
    timing[0, backend.rank], timing[1, backend.rank] = time.perf_counter() - start, nbytes
    timing = backend.all_reduce_sum(timing).cpu()  # also the barrier: every rank's file is on disk
    if backend.rank == 0:
        manifest = _manifest(session, optimizer, state, timing)
        _publish(session, optimizer, manifest, tmp, final)
        prune(root, session.cfg.train.keep_checkpoints)
        log.info("checkpoint %s: %.1f MiB per rank in %.2f s (slowest rank)", final,
                 float(timing[1].max()) / 2**20, float(timing[0].max()))
    backend.barrier()  # returns only once published: a rank that exits next cannot cut rank 0 short
    return final


def write_shards(path: Path, params) -> int:
    """This rank's shards as one safetensors file (1-D tensors, streamed; no copy of the shard)."""
    from zofsdp.saving import SAFETENSORS_DTYPES, write_tensor

    owned = [(n, d, s, f) for n, d, s, f in params if d.numel()]
    entries, slices, offset = {}, {}, 0
    for name, data, start, full in owned:
        nbytes = data.numel() * data.element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[data.dtype], "shape": [data.numel()],
                         "data_offsets": [offset, offset + nbytes]}
        slices[name] = [start, full]
        offset += nbytes
    meta = {"__metadata__": {"format": "pt", "zofsdp_slices": json.dumps(slices)}, **entries}
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _, data, _, _ in owned:
            write_tensor(f, data, data.dtype)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _manifest(session, optimizer, state: TrainerState, timing: torch.Tensor) -> dict:
    from zofsdp.cli import versions

    backend, cfg = session.backend, session.cfg
    ws = backend.world_size
    return {
        "format": FORMAT, "step": state.step, "backend": backend.name, "world_size": ws,
        "files": [{"name": f"shards-{r:05d}-of-{ws:05d}.safetensors", "bytes": int(timing[1, r]),
                   "write_s": round(float(timing[0, r]), 4)} for r in range(ws)],
        "model": model_signature(session.model),
        "noise_kind": optimizer.noise.kind,
        "data": data_position(cfg, session.splits.train, state.step),
        "trainer": asdict(state),
        "config": to_dict(cfg),
        "versions": versions(),
    }


def _publish(session, optimizer, manifest: dict, tmp: Path, final: Path) -> None:
    """Rank 0: the small files, the manifest last, fsync, one rename."""
    out = Path(session.cfg.train.output_dir)
    (tmp / "optimizer.json").write_text(json.dumps(optimizer.state_dict()))
    save_config(session.cfg, tmp / "config.yaml")
    for name in ("metrics.jsonl", seedlog.FILE):
        if (out / name).is_file():
            shutil.copyfile(out / name, tmp / name)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from an earlier attempt
    tmp.rename(final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_partial(root: Path) -> None:
    """Folders of writes that never finished (a crash, a kill): never read, so just clutter."""
    if root.is_dir():
        for path in root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted((step, p) for step, p in found if (p / MANIFEST).is_file())


def prune(root: Path, keep: int) -> None:
    for _, path in complete(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ identity checks


def model_signature(model) -> list[list]:
    """[name, full shape, dtype] of every parameter: what a checkpoint must match to be loaded."""
    from zofsdp.saving import full_shape

    return [[n, list(full_shape(p)), str(p.dtype).removeprefix("torch.")] for n, p in model.named_parameters()]


def data_position(cfg, examples, step: int) -> dict:
    """Enough to continue the data order: `batches` is a pure function of (examples, batch size, seed), so
    the position is the number of batches drawn (one per step); the fingerprint checks the examples."""
    text = json.dumps([[e.prompt, list(e.candidates), e.label] for e in examples])
    return {"batches_drawn": step, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
            "num_train": len(examples), "train_sha256": hashlib.sha256(text.encode()).hexdigest()}


def check_model(saved: list, current: list, where: Path,
                hint: str = "Resume with the model.name_or_path that wrote it, or start fresh (train.resume='')") -> None:
    """Refuse another model or shape, naming what differs."""
    old = {n: (tuple(s), d) for n, s, d in saved}
    new = {n: (tuple(s), d) for n, s, d in current}
    problems = [f"{n} is missing here" for n in old if n not in new]
    problems += [f"{n} is not in the checkpoint" for n in new if n not in old]
    problems += [f"{n} has shape {list(old[n][0])} in the checkpoint, {list(new[n][0])} here"
                 for n in old if n in new and old[n][0] != new[n][0]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{where} holds another model: {'; '.join(problems[:3])}{more}. {hint}")


def trajectory_changes(saved: dict, current: dict) -> list[str]:
    """`key: old -> new` for every config change that alters what the remaining steps compute."""
    old, new = _flatten(saved), _flatten(current)
    keys = [k for k in {**old, **new} if not k.startswith(HARMLESS)]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------------------------ resuming


def find(resume: str, out: Path) -> Path | None:
    """The checkpoint `train.resume` names: auto = the newest complete one in output_dir (None if none)."""
    if not resume:
        return None
    if resume == "auto":
        found = complete(out / ROOT)
        return found[-1][1] if found else None
    path = Path(resume)
    if (path / MANIFEST).is_file():
        return path
    found = complete(path / ROOT)
    if found:
        return found[-1][1]
    raise CheckpointError(f"train.resume={resume}: not a checkpoint (no {MANIFEST}: an interrupted write never "
                          f"has one) nor a run folder with complete checkpoints in {ROOT}/")


def resume(session, optimizer) -> TrainerState | None:
    """Load the checkpoint `train.resume` names into the model and optimizer (a collective); None: fresh."""
    cfg, backend = session.cfg, session.backend
    out = Path(cfg.train.output_dir)
    path = find(cfg.train.resume, out)
    _agree(backend, path)
    if path is None:
        _fresh_start(cfg, backend, out / ROOT)
        return None
    start = time.perf_counter()
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this zofsdp reads {FORMAT}")
    check_model(manifest["model"], model_signature(session.model), path)
    load_shards(path, manifest, backend.local_params() + state_shards(optimizer))
    small = json.loads((path / "optimizer.json").read_text())
    if state_shards(optimizer):  # read just above, with the weights; stateless optimizers get their state as saved
        small["sharded_state_loaded"] = True
    try:
        optimizer.load_state_dict(small)
    except ValueError as err:  # another optimizer's or another block list's state
        raise CheckpointError(f"{path}: {err}") from err
    state = TrainerState(**manifest["trainer"])
    if backend.rank == 0:
        changes = _changes(session, optimizer, manifest)
        if changes:
            log.warning("resuming %s with changes that alter the trajectory:\n  %s", path, "\n  ".join(changes))
        _restore_logs(path, out, state.step, changes)
    log.info("resumed from %s: step %d, saved by %d %s rank(s), loaded in %.1f s", path, state.step,
             manifest["world_size"], manifest["backend"], time.perf_counter() - start)
    return state


def _fresh_start(cfg, backend, root: Path) -> None:
    """Checkpoints of an earlier run in output_dir: refused (train.resume=auto would later mix them with
    this run's), or deleted with train.overwrite=true. Every rank decides alike (a shared file system)."""
    earlier = complete(root)
    if cfg.train.resume:
        log.info("train.resume=auto: no complete checkpoint in %s; starting fresh", root)
    elif earlier and not getattr(cfg.train, "overwrite", False):
        raise CheckpointError(f"train.output_dir={cfg.train.output_dir} holds checkpoints of an earlier run "
                              f"(newest: step {earlier[-1][0]}): continue it with train.resume=auto, or set "
                              "train.overwrite=true to start over")
    elif earlier and backend.rank == 0:
        shutil.rmtree(root)
    backend.barrier()


def _agree(backend, path: Path | None) -> None:
    """Every rank must have found the same checkpoint (else output_dir is not one shared file system)."""
    mine = int(STEP_DIR.match(path.name).group(1)) + 1 if path and STEP_DIR.match(path.name) else int(bool(path))
    total = backend.all_reduce_sum(torch.tensor([float(mine)], dtype=torch.float64, device=backend.device))
    if int(total.item()) != mine * backend.world_size:
        raise CheckpointError(f"ranks found different checkpoints to resume from (rank {backend.rank}: {path}); "
                              "train.output_dir must be on a file system every node sees")


def _changes(session, optimizer, manifest: dict) -> list[str]:
    changes = trajectory_changes(manifest["config"], to_dict(session.cfg))
    if manifest["noise_kind"] != optimizer.noise.kind:
        changes.append(f"noise kind (zo.noise resolved): {manifest['noise_kind']} -> {optimizer.noise.kind}")
    data = data_position(session.cfg, session.splits.train, 0)
    if manifest["data"]["train_sha256"] != data["train_sha256"]:
        changes.append("the training examples differ (data.dir, data.task, data.num_train or the files)")
    return changes


def _restore_logs(path: Path, out: Path, step: int, changes: list[str]) -> None:
    """metrics.jsonl and seedlog.bin as they were at the checkpoint (later lines of a crashed attempt go)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", seedlog.FILE):
        (out / name).unlink(missing_ok=True)
        if (path / name).is_file():
            shutil.copyfile(path / name, out / name)
    if changes and (out / seedlog.FILE).is_file():
        seedlog.stop_replay_at(out / seedlog.FILE, step, "; ".join(changes))


def state_shards(optimizer) -> list:
    """Parameter-sized optimizer state (ZO-Adam's moments, HiZOO's H), sharded like the parameters:
    (name, local view, global start, full numel), saved and read exactly like the weights."""
    get = getattr(optimizer, "state_shards", None)
    return list(get()) if get else []


@torch.no_grad()
def load_shards(path: Path, manifest: dict, targets: list) -> None:
    """Fill (name, local view, global start, full numel) targets from whichever saved slices overlap them
    (any saved layout): this rank's parameter shards and sharded optimizer state."""
    from safetensors import safe_open

    index = _slice_index(path, manifest)
    with ExitStack() as stack:
        files: dict = {}
        for name, view, start, _ in targets:
            covered = 0
            for file, s0, n in index.get(name, ()):
                lo, hi = max(start, s0), min(start + view.numel(), s0 + n)
                if lo >= hi:
                    continue
                if file not in files:
                    files[file] = stack.enter_context(safe_open(str(path / file), framework="pt"))
                view[lo - start : hi - start].copy_(files[file].get_slice(name)[lo - s0 : hi - s0])
                covered += hi - lo
            if covered != view.numel():
                raise CheckpointError(f"{path}: elements [{start}, {start + view.numel()}) of {name} are not "
                                      f"all in the checkpoint ({covered} found)")


def _slice_index(path: Path, manifest: dict) -> dict[str, list[tuple[str, int, int]]]:
    """name -> [(file, global start, numel)] from the files' headers (no tensor data read)."""
    from safetensors import safe_open

    index: dict[str, list] = {}
    for entry in manifest["files"]:
        file = path / entry["name"]
        size = file.stat().st_size if file.is_file() else -1
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: {'missing' if size < 0 else f'{size} bytes'}, the manifest says "
                                  f"{entry['bytes']}: the checkpoint is damaged; resume from another one")
        with safe_open(str(file), framework="pt") as f:
            slices = json.loads(f.metadata()["zofsdp_slices"])
            for name, (start, _) in slices.items():
                index.setdefault(name, []).append((entry["name"], start, f.get_slice(name).get_shape()[0]))
    return index


def full_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint as a whole flat tensor (tests, small models: allocates all)."""
    from safetensors import safe_open

    manifest = json.loads((Path(path) / MANIFEST).read_text())
    index = _slice_index(Path(path), manifest)
    out = {}
    for name, shape, dtype in manifest["model"]:
        flat = torch.empty(torch.Size(shape).numel(), dtype=getattr(torch, dtype))
        for file, s0, n in index[name]:
            with safe_open(str(Path(path) / file), framework="pt") as f:
                flat[s0 : s0 + n] = f.get_tensor(name)
        out[name] = flat.view(shape)
    return out
