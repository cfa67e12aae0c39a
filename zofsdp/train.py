"""Setup shared by every command, the evaluation loop and the training loop."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from zofsdp import checkpoint, seedlog
from zofsdp.config import RunConfig, save_config
from zofsdp.errors import UserError
from zofsdp.metrics import ForwardTimer, MetricsLog, setup_logging
from zofsdp.models import load_tokenizer
from zofsdp.optim import build_optimizer, param_shapes
from zofsdp.parallel import Backend, build_backend
from zofsdp.scoring import Batch, PendingLoss, as_floats, encode, loss_and_correct
from zofsdp.seedlog import SeedLogWriter
from zofsdp.tasks import Example, Splits, get_task, sample_splits

log = logging.getLogger("zofsdp")

MAX_CONSECUTIVE_SKIPS = 5
"""Non-finite losses: skip the update (restoring θ) and go on; this many in a row stop the run."""


@dataclass
class Session:
    cfg: RunConfig
    backend: Backend
    tokenizer: object
    model: torch.nn.Module
    splits: Splits


def setup(cfg: RunConfig, with_data: bool = True, output_dir: Path | None = None) -> Session:
    """Process group, tokenizer, data, model (loaded then wrapped by the backend). With `output_dir`, that
    folder is checked first (writable, no finished run in it), before minutes of loading. On any failure
    the process group is closed again, so a caller (or a test) can go on."""
    backend = build_backend(cfg.parallel.backend, cfg=cfg)
    try:
        return _build_session(cfg, backend, with_data, output_dir)
    except BaseException:
        backend.close()
        raise


def _build_session(cfg: RunConfig, backend: Backend, with_data: bool, output_dir: Path | None) -> Session:
    setup_logging(backend.rank)
    log.info("%s; %s backend, %d rank(s) on %s", version_line(), backend.name, backend.world_size,
             backend.device)
    if backend.name == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("parallel.backend=none runs one process; use fsdp2 or deepspeed under torchrun")
    if cfg.train.batch_size < backend.world_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is smaller than the world size "
                        f"{backend.world_size}: every rank needs at least one row")
    if output_dir is not None:
        check_output_dir(cfg, backend, output_dir)
    task = get_task(cfg.data.task)  # fail fast on a bad task name, before loading a model
    splits = Splits([], [], [])
    if with_data:
        d = cfg.data
        splits = sample_splits(task, d.dir, d.num_train, d.num_dev, d.num_eval, cfg.train.seed)
        log.info("%s: %d train, %d dev, %d eval examples from %s", task.name, len(splits.train),
                 len(splits.dev), len(splits.eval), d.dir or "the hub")
    try:
        tokenizer = load_tokenizer(cfg.model)
        model = backend.load_model(cfg.model, len(tokenizer))
    except UserError:
        raise
    except (OSError, ValueError, SafetensorError) as err:  # unreadable or corrupt model files
        raise UserError(f"model.name_or_path={cfg.model.name_or_path}: cannot load the model "
                        f"({type(err).__name__}: {_first_line(err)})") from err
    return Session(cfg, backend, tokenizer, backend.wrap(model), splits)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def check_output_dir(cfg: RunConfig, backend: Backend, out: Path) -> None:
    """Rank 0 makes sure `out` is writable and holds no finished run (unless train.overwrite); every rank
    learns the verdict through one all-reduce, so all stop together with the same message."""
    problem = _output_dir_problem(cfg, out) if backend.rank == 0 else ""
    flag = backend.all_reduce_sum(torch.tensor([1.0 if problem else 0.0], device=backend.device))
    if flag.item():
        raise UserError(problem or f"train.output_dir={out}: unusable (see rank 0's message)")


def _output_dir_problem(cfg: RunConfig, out: Path) -> str:
    if (out / "model").exists() and not (cfg.train.overwrite or cfg.train.resume):
        return (f"train.output_dir={out} already holds a finished run (model/); choose another folder, or "
                "set train.overwrite=true to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)  # a full disk fails here, not hours later
        probe.unlink()
    except OSError as err:
        return f"train.output_dir={out}: cannot write there ({err.strerror or err})"
    return ""


def version_line() -> str:
    from zofsdp.cli import versions

    return ", ".join(f"{k} {v}" for k, v in versions().items())


def local_rows(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


@torch.no_grad()
def global_loss(session: Session, batch: Batch) -> tuple[float, float]:
    """(mean loss, accuracy) of a global batch: each rank scores its rows, two scalars are all-reduced."""
    totals = enqueue_loss(session, *local_batch(session, batch)).tolist()
    return totals[0] / len(batch), totals[1] / len(batch)


def local_batch(session: Session, batch: Batch) -> tuple[Batch, float]:
    """This rank's rows of a global batch, on its device, and their weight in the global sums (0 for a
    rank with no rows: it still runs a forward, since sharded layers gather collectively)."""
    backend = session.backend
    lo, hi = local_rows(len(batch), backend.rank, backend.world_size)
    weight = 1.0
    if hi == lo:
        lo, hi, weight = 0, 1, 0.0
    return batch.rows(lo, hi).to(backend.device), weight


@torch.no_grad()
def enqueue_loss(session: Session, rows: Batch, weight: float, at: tuple[int, int] | None = None) -> torch.Tensor:
    """Forward and all-reduce, nothing read back: [summed loss, correct rows] over the global batch, a
    float64 tensor on the device (on a GPU the work is only queued when this returns). With `at` = (this
    rank's first global row, global rows), each row's loss follows at its global position (zeros from the
    other ranks), so every rank gets the per-example losses: global-rows more floats in the all-reduce."""
    loss, correct, per_row = loss_and_correct(session.model, rows)
    totals = torch.stack([loss * weight, correct.double() * weight])
    if at is not None:
        first, size = at
        every = torch.zeros(size, dtype=torch.float64, device=totals.device)
        if weight:  # a rank without rows scored a stand-in row: it adds nothing
            every[first : first + per_row.numel()] = per_row
        totals = torch.cat([totals, every])
    return session.backend.all_reduce_sum(totals)


def evaluate(session: Session, examples: list[Example]) -> dict:
    """Accuracy and mean loss over `examples`, in global batches of train.eval_batch_size."""
    size, total_loss, total_correct = session.cfg.train.eval_batch_size, 0.0, 0.0
    starts = range(0, len(examples), size)
    for start in tqdm(starts, desc="eval", leave=False, disable=session.backend.rank != 0 or len(starts) < 4):
        chunk = examples[start : start + size]
        loss, acc = global_loss(session, encode(session.tokenizer, chunk, session.cfg.model.max_length))
        total_loss += loss * len(chunk)
        total_correct += acc * len(chunk)
    n = max(len(examples), 1)
    return {"eval_accuracy": total_correct / n, "eval_loss": total_loss / n, "eval_examples": len(examples)}


def batches(examples: list[Example], batch_size: int, seed: int, skip: int = 0):
    """Endless shuffled batches, reshuffled every epoch from the seed (the same on every rank).
    `skip`: start after that many batches (a resumed run), without drawing them."""
    per_epoch = max(len(examples) // batch_size, 1)
    epoch, skip = divmod(skip, per_epoch)
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for start in range(skip * batch_size, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]
        if len(order) < batch_size:
            yield [examples[i] for i in order]
        epoch, skip = epoch + 1, 0


def extra_batch(session: Session, step: int, k: int, cache: dict) -> tuple[Batch, Batch, float]:
    """(global batch, this rank's rows, weight) of `step`'s k-th extra batch: train.batch_size examples drawn
    from the training set by (seed, step, k), the same on every rank and apart from the steps' own stream
    (so a run that never asks for one sees exactly the batches it saw before). Cached for the step."""
    if k not in cache:
        cfg = session.cfg
        rng = random.Random(f"extra-batch/{cfg.train.seed}/{step}/{k}")  # str seeds ignore PYTHONHASHSEED
        examples = rng.sample(session.splits.train, min(cfg.train.batch_size, len(session.splits.train)))
        encoded = encode(session.tokenizer, examples, cfg.model.max_length)
        cache[k] = (encoded, *local_batch(session, encoded))
    return cache[k]


def held_out(session: Session) -> list[Example]:
    return session.splits.eval if session.cfg.data.eval_split == "eval" else session.splits.dev


def train(cfg: RunConfig) -> dict:
    """Fine-tune; returns the last evaluation. Writes config.yaml, metrics.jsonl and model/ on rank 0."""
    session = setup(cfg, output_dir=Path(cfg.train.output_dir))
    try:
        with checkpoint.StopSignal() as stop:  # SIGTERM/SIGUSR1: finish the step, checkpoint, exit
            return _train_loop(session, stop)
    finally:
        session.backend.close()


def _train_loop(session: Session, stop: checkpoint.StopSignal) -> dict:
    cfg, backend = session.cfg, session.backend
    out = Path(cfg.train.output_dir)
    is_main = backend.rank == 0
    optimizer = build_optimizer(cfg.zo, backend.shards(), cfg.train.seed, backend.device,
                                blocks=backend.blocks(), probe=getattr(backend, "probe", None),
                                rounding=cfg.model.update_rounding, all_reduce=backend.all_reduce_sum,
                                shapes=param_shapes(backend))
    resumed = checkpoint.resume(session, optimizer)  # None: a fresh start
    state = resumed or checkpoint.TrainerState()
    metrics, seeds = _open_logs(session, optimizer, fresh=resumed is None)
    data = batches(session.splits.train, cfg.train.batch_size, cfg.train.seed, skip=state.step)

    result = state.last_eval if resumed else _evaluate_and_log(session, metrics, step=0)
    totals, skips_in_a_row = state.totals, state.skips_in_a_row
    progress = _progress(cfg.train.steps, is_main, initial=state.step)
    for step in range(state.step + 1, cfg.train.steps + 1):
        encoded = encode(session.tokenizer, next(data), cfg.model.max_length)
        rows, weight = local_batch(session, encoded)  # on the device once, before any probe
        timer, losses, extra = ForwardTimer(backend.device), [], {}

        def loss_fn(batch: int = 0, per_example: bool = False) -> PendingLoss:
            """The step's batch, or (batch = k >= 1) the step's k-th extra batch (DiZO's search); with
            `per_example`, each row's loss too (loss.per_example)."""
            b, r, w = (encoded, rows, weight) if batch == 0 else extra_batch(session, step, batch, extra)
            at = (local_rows(len(b), backend.rank, backend.world_size)[0], len(b)) if per_example else None
            with timer:
                loss = PendingLoss(enqueue_loss(session, r, w, at), len(b), per_example)
            totals["tokens"] += b.num_tokens
            losses.append(loss)  # the seed log: these losses and the seed determine the step
            return loss

        loss_fn.decide = lambda values: losses.extend(values) or values  # logged after the losses so far

        start = time.perf_counter()
        with torch.no_grad():
            record = as_floats(optimizer.step(loss_fn, step))
        step_s = time.perf_counter() - start
        seeds.append(step, [float(x) for x in losses])
        skipped = bool(record.pop("skipped", False))
        skips_in_a_row = skips_in_a_row + 1 if skipped else 0
        totals["skipped_steps"] += skipped
        if skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
            progress.close()  # the error goes on a line of its own
            raise UserError(f"{skips_in_a_row} steps in a row gave non-finite losses (step {step}); "
                            "lower zo.lr or zo.eps, or use model.dtype=float32")
        if skipped:
            log.warning("step %d: non-finite loss, update skipped (%d so far)", step, totals["skipped_steps"])
        totals["forward_passes"] += record.pop("forward_passes")
        totals["wall_s"] += step_s
        totals["forward_s"] += timer.seconds()
        if step % cfg.train.log_every == 0 or skipped:
            metrics.log({"step": step, **record, **totals, "step_s": step_s, "skipped": skipped})
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{result['eval_accuracy']:.3f}")
        if is_main and cfg.train.dump_state_every and step % cfg.train.dump_state_every == 0:
            _dump_state(optimizer, out / "optimizer_state" / f"step_{step:06d}.json")
        every = cfg.train.eval_every and step % cfg.train.eval_every == 0
        if (every or step in cfg.train.eval_steps) and step < cfg.train.steps:
            result = _evaluate_and_log(session, metrics, step)
        stopping = stop.requested(backend)  # every rank stops after the same step
        if stopping or checkpoint.due(cfg, step):
            path = checkpoint.save(session, optimizer, checkpoint.TrainerState(step, totals, skips_in_a_row, result))
            if stopping:
                progress.close()
                raise stop.exit(step, path)
    progress.close()
    if cfg.train.steps:
        result = _evaluate_and_log(session, metrics, cfg.train.steps)
    if cfg.train.checkpoint_every and state.step < cfg.train.steps:
        state = checkpoint.TrainerState(cfg.train.steps, totals, skips_in_a_row, result)
        checkpoint.save(session, optimizer, state)
    if cfg.train.save_model:
        save_model(session, out / "model")
    metrics.close()
    seeds.close()
    return result


def _evaluate_and_log(session: Session, metrics: MetricsLog, step: int) -> dict:
    examples = held_out(session)
    start = time.perf_counter()
    result = evaluate(session, examples)
    metrics.log({"step": step, **result, "eval_split": session.cfg.data.eval_split,
                 "eval_s": time.perf_counter() - start})
    log.info("step %d: %s accuracy %.4f, loss %.4f (%d examples)", step, session.cfg.data.eval_split,
             result["eval_accuracy"], result["eval_loss"], len(examples))
    return result


def _dump_state(optimizer, path: Path) -> None:
    """The optimizer's small state (CurvZO block scores, AdaLeZO rewards) as JSON, for inspection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(optimizer.state_dict(), indent=1))


def _progress(total: int, enabled: bool, initial: int = 0):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True,
                mininterval=1.0)


def _open_logs(session: Session, optimizer, fresh: bool) -> tuple[MetricsLog, SeedLogWriter]:
    """Rank 0's config.yaml, metrics.jsonl and seed log: new, or (resumed) the checkpoint's copies continued."""
    cfg, out = session.cfg, Path(session.cfg.train.output_dir)
    if session.backend.rank != 0:
        return MetricsLog(None), SeedLogWriter(None)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml", header=f"written by {version_line()}")
    if fresh:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    header = None
    if fresh or not (out / seedlog.FILE).is_file():
        header = seedlog.header(cfg, optimizer.noise.kind, checkpoint.model_signature(session.model))
    return MetricsLog(out / "metrics.jsonl"), SeedLogWriter(out / seedlog.FILE, header)


def save_model(session: Session, folder: Path) -> None:
    """Write a safetensors folder that from_pretrained loads, every rank writing its files (a collective;
    no host holds the whole model: zofsdp.saving). Weights in train.save_dtype (default model.dtype)."""
    from zofsdp.measure.host import MIB, host_peak
    from zofsdp.saving import save_sharded

    dtype = getattr(torch, session.cfg.train.save_dtype or session.cfg.model.dtype)
    with host_peak() as peak:
        save_sharded(session.backend, session.model, folder, dtype, session.tokenizer)
    log.info("saved the model to %s in %.1f s (%s; rank %d host peak +%.0f MiB)", folder, peak.seconds,
             session.cfg.train.save_dtype or session.cfg.model.dtype, session.backend.rank,
             peak.peak_above_baseline / MIB)
