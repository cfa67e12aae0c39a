"""DiZO (zofsdp/optim/dizo.py): the projection's effect, the ZO search of γ, MeZO between projections,
forwards and bytes per step, its state for checkpoints, and replay from the seed log."""

from __future__ import annotations

import pytest
import torch

from tests.unit.sparse_problems import Quadratic
from zofsdp import seedlog
from zofsdp.config import ZOConfig, from_dict
from zofsdp.optim import build_optimizer
from zofsdp.replay import _oracle

TARGETS = ["layers.0.", "layers.2."]  # of Quadratic's model.layers.<i>.weight


def dizo(lr=1e-2, **section) -> ZOConfig:
    return from_dict(ZOConfig, {"optimizer": "dizo", "lr": lr, "eps": 1e-3, "chunk_numel": 1024,
                                "dizo": {"interval": 3, "targets": TARGETS, **section}})


def problem() -> Quadratic:
    return Quadratic([3000, 2000, 1500], [1.0, 2.0, 0.5], dtype=torch.float32)


def oracle(p: Quadratic, calls: list | None = None):
    """The trainer's protocol: loss_fn(batch=k), and `decide` logging the decided floats."""
    def loss_fn(batch: int = 0) -> float:
        if calls is not None:
            calls.append(batch)
        return p.loss()

    loss_fn.decide = lambda values: values
    return loss_fn


def test_projection_puts_each_tensor_at_its_gamma_along_its_own_direction():
    p = problem()
    opt = build_optimizer(dizo(), p.shards, seed=0)
    for step in (1, 2):
        opt.step(p.loss, step)
    before = [s.data.clone() for s in p.shards]
    anchors = [opt.anchor[i] for i, _ in opt.local]
    t = opt.distances()
    factors, gamma, t_search, forwards = opt.search(oracle(p), 3)
    assert forwards == 20 and t_search == t
    eps = torch.finfo(torch.float32).eps
    for (i, _), anchor in zip(opt.local, anchors):  # 20 probes undone by the inverse map, as the code: each
        # leaves ~1 ulp of the larger of θ, θ0 (measured: at most 5 after the 20)
        gap = (p.shards[i].data - before[i]).abs() / (eps * torch.maximum(before[i].abs(), anchor.abs()))
        assert float(gap.max()) <= 8
    opt.scale(factors)
    after = opt.distances()
    for j, (i, _) in enumerate(opt.local):
        assert 0.8 * t[j] <= gamma[j] <= 1.2 * t[j]  # τ = 0.2
        assert after[j] == pytest.approx(gamma[j], rel=1e-5)  # ‖θ − θ0‖ is now γ
        old, new = before[i] - anchors[j], p.shards[i].data - anchors[j]
        assert torch.nn.functional.cosine_similarity(old, new, dim=0) > 1 - 1e-6  # same direction
    assert torch.equal(p.shards[1].data, before[1])  # not a target: untouched


@pytest.mark.parametrize(("aims", "expected"), [((0.9, 1.1), (0.9, 1.1)), ((0.5, 1.5), (0.8, 1.2))])
def test_search_finds_the_loss_minimising_gamma_within_the_radius(aims, expected):
    """L = Σ_i ‖θ_i − (θ0_i + c_i·(θ_i − θ0_i))‖² with θ_i at the round's start is minimal at γ_i = c_i·t_i:
    inside [(1 − τ)t, (1 + τ)t] the search finds it, outside it stops at the bound (τ = 0.2)."""
    p = problem()
    opt = build_optimizer(dizo(search_iters=300, proj_lr=0.05, new_batches=False), p.shards, seed=0)
    for i, _ in opt.local:  # move θ away from the anchor
        p.shards[i].data.add_(torch.randn(p.shards[i].numel, generator=torch.Generator().manual_seed(i)) * 0.02)
    centres = {i: opt.anchor[i] + c * (p.shards[i].data - opt.anchor[i]) for (i, _), c in zip(opt.local, aims)}

    def loss_fn(batch: int = 0) -> float:
        return sum(float((p.shards[i].data.double() - centres[i].double()).square().sum()) for i in centres)

    t = opt.distances()
    _, gamma, _, forwards = opt.search(loss_fn, 3)
    assert forwards == 600
    for g, ti, want in zip(gamma, t, expected):
        assert g / ti == pytest.approx(want, abs=0.01)


def test_between_projections_it_is_mezo_bitwise():
    results = {}
    for name in ("mezo", "dizo"):
        p = problem()
        cfg = dizo() if name == "dizo" else ZOConfig(optimizer="mezo", lr=1e-2, eps=1e-3, chunk_numel=1024)
        opt = build_optimizer(cfg, p.shards, seed=0)
        flats = []
        for step in range(1, 4):
            opt.step(oracle(p), step)
            flats.append(p.flat())
        results[name] = flats
    assert torch.equal(results["mezo"][0], results["dizo"][0]) and torch.equal(results["mezo"][1], results["dizo"][1])
    sizes = [3000, 2000, 1500]
    m, d = results["mezo"][2].split(sizes), results["dizo"][2].split(sizes)
    assert torch.equal(m[1], d[1])  # step 3 projects only the targets
    assert not torch.equal(m[0], d[0]) and not torch.equal(m[2], d[2])


def test_forwards_per_step_and_bytes_crossing_ranks(monkeypatch):
    """2 forwards a step, 2 + 2·search_iters on a projection step; the only traffic of its own is one
    all-reduce of one float64 per projected tensor per projection (16 B here); no torch.distributed call."""
    from tests.unit.test_next_optimizers import COLLECTIVES

    for fn in COLLECTIVES:
        monkeypatch.setattr(torch.distributed, fn, lambda *a, **k: pytest.fail("a collective"), raising=False)
    reduced = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        reduced.append(t.numel() * t.element_size())
        return t

    p = problem()
    opt = build_optimizer(dizo(search_iters=4), p.shards, seed=0, all_reduce=all_reduce)
    for step in range(1, 7):
        calls, before = [], len(reduced)
        record = opt.step(oracle(p, calls), step)
        projecting = step % 3 == 0
        assert len(calls) == record["forward_passes"] == (10 if projecting else 2)
        assert calls == ([0, 0, 1, 1, 2, 2, 3, 3, 4, 4] if projecting else [0, 0])  # a new batch per iteration
        assert reduced[before:] == ([8 * len(TARGETS)] if projecting else [])


def test_anchor_is_sharded_state_of_exactly_the_targets():
    p = problem()
    opt = build_optimizer(dizo(), p.shards, seed=0)
    state = opt.state_shards()
    assert [name for name, *_ in state] == ["dizo.anchor.model.layers.0.weight", "dizo.anchor.model.layers.2.weight"]
    assert sum(t.numel() * t.element_size() for _, t, _, _ in state) == 4 * (3000 + 1500)  # P_proj × fp32
    small = opt.state_dict()
    with pytest.raises(ValueError, match="anchor"):
        build_optimizer(dizo(), problem().shards, seed=0).load_state_dict(small)
    build_optimizer(dizo(), problem().shards, seed=0).load_state_dict({**small, "sharded_state_loaded": True})
    with pytest.raises(ValueError, match="no parameter"):
        build_optimizer(dizo(targets=["nothing"]), problem().shards, seed=0)


def test_replay_applies_the_logged_factors_and_rebuilds_the_weights_bitwise():
    p, records = problem(), []
    opt = build_optimizer(dizo(search_iters=3), p.shards, seed=5)
    for step in range(1, 8):
        logged = []

        def loss_fn(batch: int = 0, logged=logged) -> float:
            logged.append(p.loss() + 0.01 * batch)
            return logged[-1]

        loss_fn.decide = lambda values, logged=logged: logged.extend(values) or values
        opt.step(loss_fn, step)
        records.append(seedlog.Record(step, tuple(logged)))
    assert [len(r.losses) for r in records] == [2, 2, 2 + 6 + 2, 2, 2, 2 + 6 + 2, 2]  # losses, then 2 factors
    q = problem()
    again = build_optimizer(dizo(search_iters=3), q.shards, seed=5)
    for record in records:
        again.step(_oracle(record), record.step)
    assert torch.equal(p.flat(), q.flat())
    # the factors come from the log: a changed factor changes the replayed weights
    tampered = records[2].losses[:-1] + (records[2].losses[-1] * 0.5,)
    r = problem()
    third = build_optimizer(dizo(search_iters=3), r.shards, seed=5)
    for record in [*records[:2], seedlog.Record(3, tampered)]:
        third.step(_oracle(record), record.step)
    assert not torch.equal(r.flat().split([3000, 2000, 1500])[2], q.flat().split([3000, 2000, 1500])[2])


@pytest.mark.parametrize(("override", "message"), [
    ("zo.dizo.radius=0.5", "radius"), ("zo.dizo.interval=0", "interval"), ("zo.dizo.targets=[]", "targets"),
])
def test_bad_settings_are_refused_naming_the_field(override, message):
    from zofsdp.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_bf16_shards_are_refused_with_the_fix():
    from zofsdp.optim.probe import Probe

    with pytest.raises(ValueError, match="fp32 shards"):
        build_optimizer(dizo(), problem().shards, seed=0, probe=Probe())


def test_mixed_precision_probes_the_fp32_shards_in_place():
    from zofsdp.config import ModelConfig, perturbs_gathered

    assert not perturbs_gathered(ModelConfig(dtype="float32", compute_dtype="bfloat16"), "dizo")
    assert perturbs_gathered(ModelConfig(dtype="float32", compute_dtype="bfloat16"), "mezo")
