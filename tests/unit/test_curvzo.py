"""CurvZO: unbiased HT estimate, curvature-weighted variance, budget, skipping, rank-independent masks."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.sparse_problems import Quadratic, chi_square, estimates, zo_config
from zofsdp.config import CurvZOConfig
from zofsdp.optim.curvzo import CurvZO
from zofsdp.optim.mezo import MeZO
from zofsdp.optim.sampling import budgeted_probs, build_units

GEOMETRIC = [0.5**i for i in range(6)]


def test_ht_estimate_is_unbiased():
    """Mean of ĝ over 1500 draws vs ∇L: χ² over d = 12 coordinates below d + 5·√(2d) ≈ 36.5 (the
    Monte-Carlo tolerance). The same draws without the 1/π weights must fail it (the test has power)."""
    problem = Quadratic([2] * 6, GEOMETRIC)
    cfg = zo_config(lr=1.0, curvzo=CurvZOConfig(budget_init=0.3, adaptive_budget=False, max_weight=0))
    opt = CurvZO(problem.shards, cfg, seed=0)
    probs = []
    draws = estimates(opt, problem, 1500, on_step=lambda o: probs.append(o.keep_probs().repeat_interleave(2)))
    d = draws.shape[1]
    limit = d + 5 * math.sqrt(2 * d)
    assert chi_square(draws, problem.grad()) < limit
    assert chi_square(draws * torch.stack(probs), problem.grad()) > 10 * limit


def h_weighted_error(draws: torch.Tensor, problem: Quadratic) -> float:
    """E[(ĝ − g)ᵀ H (ĝ − g)]: what the descent lemma charges a step (η²/2 times it)."""
    return float((((draws - problem.grad()) ** 2) * problem.h).sum(dim=1).mean())


def test_curvature_sampling_beats_uniform_at_equal_budget():
    """Anisotropic quadratic (h_b = 2^-b), fixed budget 0.3: CurvZO's learned π gives a smaller
    curvature-weighted error than uniform π = 0.3. Theory at the fixed point: −17 %; measured here
    −7 % to −10 % per seed (±3 % Monte-Carlo); pooled over two seeds we ask for −6 %.

    Not the Euclidean MSE: with Gaussian z that one is no better than uniform (docs/optimizers.md)."""
    errors = {"ema": 0.0, "uniform": 0.0}
    for name in errors:
        cfg = zo_config(lr=1.0, curvzo=CurvZOConfig(budget_init=0.3, adaptive_budget=False, max_weight=0,
                                                    score=name))
        for seed in (1, 2):
            problem = Quadratic([2] * 10, [0.5**i for i in range(10)])
            opt = CurvZO(problem.shards, cfg, seed=seed)
            estimates(opt, problem, 150)  # learn the scores
            errors[name] += h_weighted_error(estimates(opt, problem, 1500, first_step=151), problem)
    assert errors["ema"] < 0.94 * errors["uniform"], errors


def sized_units(sizes: list[int]):
    return build_units([(f"t{i}", n, f"layers.{i}") for i, n in enumerate(sizes)], "tensor")


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.7])
def test_probs_within_bounds_and_meet_budget(budget):
    units = sized_units([10, 1000, 50, 7, 400, 3000])
    weights = torch.tensor([5.0, 0.01, 1.0, 30.0, 0.2, 0.05], dtype=torch.float64)
    probs = budgeted_probs(weights.sqrt(), units.sizes, budget, pi_min=0.05)
    assert float(probs.min()) >= 0.05 and float(probs.max()) <= 1.0
    assert float((probs * units.sizes).sum()) == pytest.approx(budget * units.total, rel=1e-9)
    unclipped = (probs > 0.05) & (probs < 1.0)
    ratio = probs[unclipped] / weights.sqrt()[unclipped]  # π ∝ √S wherever no clip binds
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)


def budget_after(scores: list[float], steps: int = 100) -> float:
    problem = Quadratic([4] * len(scores), [1.0] * len(scores))
    opt = CurvZO(problem.shards, zo_config(curvzo=CurvZOConfig(score="ema")), seed=0)
    opt.ema.second_moment = torch.tensor(scores, dtype=torch.float64)
    opt.ema.num_kept += 1
    for _ in range(steps):
        opt.update_budget()
    return opt.budget


def test_budget_shrinks_when_concentrated_and_grows_when_flat():
    c = CurvZOConfig()
    flat = budget_after([1.0] * 20)
    concentrated = budget_after([1e4] + [1e-4] * 19)
    assert flat > c.budget_init and flat == pytest.approx(c.budget_max, abs=1e-3)
    assert concentrated < c.budget_init and concentrated < c.budget_min + 0.05 * (c.budget_max - c.budget_min)
    assert budget_after([1e4] + [1e-4] * 19, steps=1) > concentrated  # smoothed: moves gradually


def test_unpicked_blocks_are_untouched_and_generate_no_noise():
    """Tensors of 2500 elements = 3 chunks of 1024: a step generates 3 passes × 3 chunks per kept block
    and nothing for the others, whose bits do not change."""
    problem = Quadratic([2500] * 8, [1.0] * 8, dtype=torch.float32)
    opt = CurvZO(problem.shards, zo_config(lr=1e-2, curvzo=CurvZOConfig(budget_init=0.3,
                                                                         adaptive_budget=False)), seed=3)
    seen_mixed = False
    for step in range(1, 6):
        keep = opt.draw_mask(opt.keep_probs(), step)
        before = [p.clone() for p in problem.params]
        chunks = opt.noise.num_chunks_generated
        opt.step(problem.loss, step)
        assert opt.noise.num_chunks_generated - chunks == 3 * 3 * int(keep.sum())
        for kept, old, new in zip(keep.tolist(), before, problem.params):
            assert torch.equal(old, new) != kept
        seen_mixed |= 0 < int(keep.sum()) < len(keep)
    assert seen_mixed


def test_masks_depend_on_the_full_block_list_not_on_local_shards():
    """A rank that owns no rows of a tensor still draws the same masks, given the backend's block list."""
    problem = Quadratic([64] * 6, [1.0] * 6)
    blocks = [(s.name, s.full_numel, s.group) for s in problem.shards]
    cfg = zo_config(curvzo=CurvZOConfig())
    full = CurvZO(problem.shards, cfg, seed=7)
    partial = CurvZO(problem.shards[1:4], cfg, seed=7, blocks=blocks)
    for step in range(1, 20):
        probs = partial.keep_probs()
        keep = partial.draw_mask(probs, step)
        assert torch.equal(keep, full.draw_mask(full.keep_probs(), step))
        g = full.step(problem.loss, step)["projected_grad"]  # the all-reduced scalar both ranks see
        partial.learn(keep, probs, g, step)
    assert torch.equal(full.energy.gram, partial.energy.gram) and full.budget == partial.budget
    assert torch.equal(full.keep_probs(), partial.keep_probs())


def test_layer_granularity_groups_tensors():
    names = [("model.embed_tokens.weight", 100, "embed"), ("a.q", 10, "layers.0"), ("a.k", 10, "layers.0"),
             ("b.q", 10, "layers.1"), ("model.norm.weight", 4, "head")]
    units = build_units(names, "layer")
    assert units.names == ["embed", "layers.0", "layers.1", "head"]
    assert units.sizes.tolist() == [100, 20, 10, 4]


def test_reaches_target_loss_with_far_less_noise_than_mezo():
    """Quadratic (10 blocks, h_b = 2^-b), same lr, 5 seeds, target = 25 % of the start loss.

    Measured here: CurvZO needs about as many forward passes as MeZO (mean 161 vs 181) while generating
    ~40 % of MeZO's noise per step. We assert the mean forward passes are at most 1.25× MeZO's and the
    mean noise elements at most 0.7× MeZO's. (At each method's best lr MeZO needs fewer forward passes:
    an HT-weighted sparse estimator cannot beat dense Gaussian probes per pass on a quadratic; see
    docs/optimizers.md.)"""
    results = {"mezo": [], "curvzo": []}
    for name, cls in (("mezo", MeZO), ("curvzo", CurvZO)):
        for seed in range(5):
            problem = Quadratic([4] * 10, [0.5**i for i in range(10)])
            opt = cls(problem.shards, zo_config(lr=0.02, curvzo=CurvZOConfig(score="ema", max_weight=0)), seed=seed)
            target, passes, noise = 0.25 * problem.loss(), 0, 0.0
            for step in range(1, 2001):
                record = opt.step(problem.loss, step)
                passes += record["forward_passes"]
                noise += 3 * record["keep_fraction"]
                if problem.loss() < target:
                    break
            results[name].append((passes, noise))
    mean = {k: [sum(col) / len(col) for col in zip(*v)] for k, v in results.items()}
    assert mean["curvzo"][0] <= 1.25 * mean["mezo"][0], results
    assert mean["curvzo"][1] <= 0.7 * mean["mezo"][1], results


def test_uniform_score_is_flat_at_the_budget_unbiased_and_never_learns():
    """score=uniform (the protocol's uniform-sparse control): π = budget_init on every block, the budget
    fixed even with adaptive_budget on, ĝ unbiased (χ² as above), and the mean keep_fraction over 1500
    steps within 4 standard errors of the budget (blocks of unequal size, so it is a parameter fraction)."""
    sizes = [2, 3, 1, 4, 2, 3]
    problem = Quadratic(sizes, GEOMETRIC)
    cfg = zo_config(lr=1.0, curvzo=CurvZOConfig(score="uniform", budget_init=0.3, max_weight=0))
    opt = CurvZO(problem.shards, cfg, seed=4)
    fractions = []
    draws = estimates(opt, problem, 1500, on_step=lambda o: fractions.append(
        float((o.units.sizes * o.draw_mask(o.keep_probs(), len(fractions) + 1)).sum()) / o.units.total))
    assert torch.equal(opt.keep_probs(), torch.full((6,), 0.3, dtype=torch.float64)) and opt.budget == 0.3
    d = draws.shape[1]
    assert chi_square(draws, problem.grad()) < d + 5 * math.sqrt(2 * d)
    f = torch.tensor(fractions, dtype=torch.float64)
    assert abs(float(f.mean()) - 0.3) < 4 * float(f.std()) / math.sqrt(f.numel())
