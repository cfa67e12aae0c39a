"""Checkpoint pieces without processes: data order, slices across layouts, identity checks, optimizer
state, atomic folders, and the seed log replaying every optimizer (skipped steps included) bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zofsdp import checkpoint, seedlog
from zofsdp.config import ZOConfig, load_config, to_dict
from zofsdp.noise import Shard, block_id
from zofsdp.optim import build_optimizer
from zofsdp.replay import _oracle
from zofsdp.train import batches


@pytest.mark.parametrize(("num", "size"), [(48, 12), (50, 12), (7, 12), (12, 12)])
def test_batches_skip_equals_the_stream_from_step_n(num, size):
    examples = list(range(num))
    stream = batches(examples, size, seed=3)
    full = [next(stream) for _ in range(20)]
    for skip in (0, 1, 3, 4, 9):
        resumed = batches(examples, size, seed=3, skip=skip)
        assert [next(resumed) for _ in range(20 - skip)] == full[skip:]


# ------------------------------------------------------------------------------- shards across layouts

SHAPES = {"a.weight": (10, 7), "b.bias": (5,), "c.weight": (3, 11)}


def _full() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(math.prod(s), generator=g) for n, s in SHAPES.items()}


def _layout(full: dict, rank: int, world: int, even: bool) -> list:
    """local_params of one rank: Shard(0)-like rows (even=False) or ZeRO-3-like ceil splits (even=True)."""
    out = []
    for name, flat in full.items():
        rows = SHAPES[name][0]
        per = math.ceil((flat.numel() if even else rows) / world)
        unit = 1 if even else flat.numel() // rows
        lo, hi = min(rank * per * unit, flat.numel()), min((rank + 1) * per * unit, flat.numel())
        out.append((name, flat[lo:hi].clone(), lo if hi > lo else 0, flat.numel()))
    return out


def _save(folder, full: dict, world: int) -> dict:
    folder.mkdir()
    files = []
    for rank in range(world):
        name = f"shards-{rank:05d}-of-{world:05d}.safetensors"
        size = checkpoint.write_shards(folder / name, _layout(full, rank, world, even=False))
        files.append({"name": name, "bytes": size})
    return {"files": files}


@pytest.mark.parametrize(("saved", "loaded", "even"), [(2, 3, False), (2, 1, False), (3, 2, True), (1, 4, True)])
def test_any_layout_reads_any_saved_layout(tmp_path, saved, loaded, even):
    full = _full()
    manifest = _save(tmp_path / "ckpt", full, saved)
    for rank in range(loaded):
        params = [(n, torch.zeros_like(d), s, f) for n, d, s, f in _layout(full, rank, loaded, even)]
        checkpoint.load_shards(tmp_path / "ckpt", manifest, params)
        for (name, data, start, _), (_, want, _, _) in zip(params, _layout(full, rank, loaded, even)):
            assert torch.equal(data, want), (name, rank)


def test_truncated_shard_file_is_refused(tmp_path):
    manifest = _save(tmp_path / "ckpt", _full(), 2)
    path = tmp_path / "ckpt" / manifest["files"][1]["name"]
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load_shards(tmp_path / "ckpt", manifest, [])


# ------------------------------------------------------------------------------------- identity checks


def test_another_model_is_refused_naming_what_differs(tmp_path):
    saved = [["embed.weight", [100, 8], "float32"], ["head.weight", [8, 8], "float32"]]
    other = [["embed.weight", [120, 8], "float32"], ["head.weight", [8, 8], "float32"], ["x.bias", [8], "float32"]]
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_model(saved, other, tmp_path)
    assert "embed.weight has shape [100, 8] in the checkpoint, [120, 8] here" in str(err.value)
    assert "x.bias is not in the checkpoint" in str(err.value)
    checkpoint.check_model(saved, saved, tmp_path)  # the same model passes


def test_trajectory_changes_list_what_matters_only():
    old = to_dict(load_config(None, []))
    new = to_dict(load_config(None, ["zo.lr=3e-4", "train.steps=999", "train.output_dir=x", "train.seed=5",
                                     "parallel.backend=fsdp2", "zo.noise_threads=3", "train.eval_steps=[5,10]"]))
    changes = checkpoint.trajectory_changes(old, new)
    assert sorted(c.split(":")[0] for c in changes) == ["train.seed", "zo.lr"], changes


def test_newest_complete_checkpoint_wins_and_partial_writes_are_ignored(tmp_path):
    root = tmp_path / checkpoint.ROOT
    for step in (3, 6, 9):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / checkpoint.MANIFEST).write_text("{}")
    (root / "step_00000012").mkdir()  # no manifest: never published
    (root / ".tmp-step_00000015").mkdir()  # an interrupted write
    assert checkpoint.find("auto", tmp_path) == root / "step_00000009"
    assert checkpoint.find(str(tmp_path), tmp_path / "elsewhere") == root / "step_00000009"
    assert checkpoint.find("", tmp_path) is None
    checkpoint.prune(root, keep=2)
    assert [s for s, _ in checkpoint.complete(root)] == [6, 9]
    with pytest.raises(checkpoint.CheckpointError, match="interrupted write"):
        checkpoint.find(str(root / "step_00000012"), tmp_path)


# ------------------------------------------------------------------------------ optimizers and replay


def _shards(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Shard]:
    g = torch.Generator().manual_seed(seed)
    names = [("embed.weight", "embed"), ("layers.0.w", "layers.0"), ("layers.0.b", "layers.0"),
             ("layers.1.w", "layers.1"), ("head.weight", "head")]
    return [Shard(n, (torch.randn(3000 + 700 * i, generator=g) * 0.02).to(dtype), 0, 3000 + 700 * i, block_id(n),
                  n.endswith(("w", "weight")), group) for i, (n, group) in enumerate(names)]


def _loss(shards: list[Shard], step: int, calls: list[int]) -> float:
    """A cheap loss of the weights; non-finite at step 3 (a skipped step) and once at step 5."""
    calls[0] += 1
    if step == 3 or (step == 5 and calls[0] % 2):
        return float("nan")
    return sum(float((s.data.double() * torch.linspace(-1, 1, s.numel, dtype=torch.float64)).sum())
               for s in shards) + 0.3


@pytest.mark.parametrize(("name", "dtype"), [
    *[(n, torch.float32) for n in ("mezo", "curvzo", "adalezo", "bszo", "bszo_b", "zo_adam", "hizoo", "loren")],
    ("curvzo", torch.bfloat16)])
def test_replay_of_the_logged_losses_rebuilds_the_weights_bitwise(name, dtype):
    """bf16: probes go through a Probe (no shard is perturbed), updates round stochastically: replay too."""
    from zofsdp.optim.probe import Probe

    cfg = ZOConfig(optimizer=name, lr=1e-2, eps=1e-3, noise="gaussian", chunk_numel=1024, weight_decay=0.1)
    probe = (lambda: Probe()) if dtype != torch.float32 else (lambda: None)
    trained, records, skipped = _shards(dtype=dtype), [], 0
    shapes = {s.name: (s.full_numel // 100, 100) for s in trained}  # read by LOREN only
    opt = build_optimizer(cfg, trained, seed=7, probe=probe(), shapes=shapes)
    for step in range(1, 9):
        losses, calls = [], [0]

        def loss_fn(step=step, losses=losses, calls=calls):
            losses.append(_loss(trained, step, calls))
            return losses[-1]

        skipped += bool(opt.step(loss_fn, step).get("skipped"))
        records.append(seedlog.Record(step, tuple(losses)))
    assert skipped == 2
    replayed = _shards(dtype=dtype)
    again = build_optimizer(cfg, replayed, seed=7, probe=probe(), shapes=shapes)
    assert not all(torch.equal(a.data, b.data) for a, b in zip(trained, replayed))  # training moved them
    for record in records:
        again.step(_oracle(record), record.step)
    for a, b in zip(trained, replayed):
        assert torch.equal(a.data, b.data), a.name
    assert json.dumps(opt.state_dict()) == json.dumps(again.state_dict())


@pytest.mark.parametrize("name", ["curvzo", "adalezo", "bszo"])
def test_optimizer_state_round_trips_and_gives_the_same_next_steps(name):
    cfg = ZOConfig(optimizer=name, lr=1e-2, eps=1e-3, noise="gaussian", chunk_numel=1024)
    a = build_optimizer(cfg, _shards(), seed=1)
    for step in range(1, 6):
        a.step(lambda step=step: _loss(a.shards, step, [0]) if step != 3 else 1.0, step)
    b = build_optimizer(cfg, [Shard(s.name, s.data.clone(), 0, s.full_numel, s.block_id, s.decay, s.group)
                              for s in a.shards], seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step in range(6, 9):
        ra = a.step(lambda step=step: _loss(a.shards, step, [0]), step)
        rb = b.step(lambda step=step: _loss(b.shards, step, [0]), step)
        assert ra == rb
    for x, y in zip(a.shards, b.shards):
        assert torch.equal(x.data, y.data)
    with pytest.raises(ValueError, match="curvzo|adalezo|MeZO"):
        build_optimizer(ZOConfig(optimizer="mezo"), _shards(), seed=1).load_state_dict(a.state_dict())


def test_seed_log_round_trip_drops_a_torn_record(tmp_path):
    path = tmp_path / seedlog.FILE
    log = seedlog.SeedLogWriter(path, {"format": 1, "replayable_until": None})
    log.append(1, [0.5, 0.25])
    log.append(2, [float("nan"), 1e300])
    log.append(3, [0.125])
    log.close()
    path.write_bytes(path.read_bytes()[:-3])  # a crash in the middle of step 3's record
    header, records = seedlog.read(path)
    assert header["format"] == 1 and [r.step for r in records] == [1, 2]
    assert records[0].losses == (0.5, 0.25) and math.isnan(records[1].losses[0])
    seedlog.stop_replay_at(path, 1, "zo.lr: 0.001 -> 0.002")
    header, records = seedlog.read(path)
    assert header["replayable_until"] == 1 and len(records) == 2
    assert len(path.read_bytes()) - len(seedlog.encode_header(header)) == 2 * 22  # 22 bytes per 2-loss step
