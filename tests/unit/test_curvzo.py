"""CurvZO: unbiased HT estimate, curvature-weighted variance, budget, skipping, rank-independent masks."""

from __future__ import annotations

import functools
import json
import math
import re

import pytest
import torch

from tests.unit.sparse_problems import (
    Quadratic,
    chi_square,
    estimates,
    f3_quadratic,
    passes_to_target,
    zo_config,
)
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
    """score=ema, no clip (the first rule; the figures below are its). Quadratic (10 blocks, h_b = 2^-b),
    same lr, 5 seeds, target = 25 % of the start loss.

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


# ------------------------------------------------------------------ issue 14: informative scores


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def recovered_rank_correlation(seed: int, steps: int = 2000, **cfg) -> float:
    """32 blocks with log-normal G_b (σ = 1); Δ simulated directly as N(0, Σ_b m_b G_b), the law of uᵀg
    for u = m ⊙ z, with the masks the optimizer itself draws (its π follows its own estimates)."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randn(32, generator=gen, dtype=torch.float64).exp()
    problem = Quadratic([1] * 32, [1.0] * 32)
    opt = CurvZO(problem.shards, zo_config(curvzo=CurvZOConfig(**cfg)), seed=seed)
    for step in range(1, steps + 1):
        probs = opt.keep_probs()
        keep = opt.draw_mask(probs, step)
        delta = float(torch.randn(1, generator=gen, dtype=torch.float64)) * float((truth * keep).sum()) ** 0.5
        opt.learn(keep, probs, delta, step)
    estimate = opt.g_hat() if opt.c.score == "regression" else opt.ema.scores()
    return spearman(estimate, truth)


FOCUSED = {"budget_init": 0.1, "budget_min": 0.1, "adaptive_budget": False}


def test_regression_recovers_block_gradient_energy():
    """score=regression after 2,000 steps: mean Spearman(Ĝ, G) over 3 seeds ≥ 0.6 at a fixed budget of 0.1
    (measured 0.83, 0.79, 0.91). At the default adaptive budget (it settles near 0.38) the same
    measurement gives 0.585 on average over 6 seeds (0.53–0.66): more blocks kept per step share one Δ²."""
    rho = [recovered_rank_correlation(seed, **FOCUSED) for seed in range(3)]
    assert sum(rho) / 3 >= 0.6, rho


def test_old_ema_score_stays_uninformative():
    """The documented regression test for score=ema (the first rule, kept for comparison): its scores do
    not rank the blocks (mean Spearman 0.17 over these seeds, 0.06 over 6 (−0.22 to 0.24); review: −0.16). If this fails
    the rule has become informative and docs/optimizers.md must change."""
    rho = [recovered_rank_correlation(seed, score="ema") for seed in range(3)]
    assert sum(rho) / 3 < 0.3, rho


class TwoBatchQuadratic(Quadratic):
    """Batch k's loss ½Σ h θ² + ξ_kᵀθ: its gradient is ḡ + ξ_k, ξ_k ~ N(0, V_b/n_b) per coordinate of unit b,
    fresh for every (step, k), the same for ℓ₊ and ℓ₋: ‖ḡ_b‖² and the noise V_b are known."""

    def __init__(self, start: list[float], noise: list[float], size: int = 8):
        super().__init__([size] * len(start), [1.0] * len(start), start=start)
        self.sd = torch.cat([torch.full((size,), math.sqrt(v / size), dtype=torch.float64) for v in noise])
        self.energy = torch.tensor([size * x * x for x in start], dtype=torch.float64)

    def oracle(self, step: int):
        def loss(batch: int = 0) -> float:
            gen = torch.Generator().manual_seed(1000 * step + batch)
            xi = torch.randn(self.theta.numel(), generator=gen, dtype=torch.float64) * self.sd
            return self.loss() + float(xi @ self.theta)
        return loss


def snr_recovery(seed: int, steps: int = 6000) -> tuple[float, float, float, float]:
    """score=snr, 16 units with independent log-normal ‖ḡ_b‖² and batch noise V_b of similar size, lr 0, the
    second batch on every step, masks from its own π: Spearman of (P̂ vs ‖ḡ‖², Ĝ − P̂ vs V, P̂/(Ĝ − P̂) vs
    ‖ḡ‖²/V, and Ĝ alone vs ‖ḡ‖²)."""
    gen = torch.Generator().manual_seed(seed)
    start, noise = torch.randn(16, generator=gen).mul(0.5).exp(), 8 * torch.randn(16, generator=gen).exp()
    problem = TwoBatchQuadratic(start.tolist(), noise.tolist())
    opt = CurvZO(problem.shards, zo_config(lr=0.0, curvzo=CurvZOConfig(score="snr", snr_every=1)), seed=seed)
    for step in range(1, steps + 1):
        opt.step(problem.oracle(step), step)
    pop, noisy, v = opt.signal.estimate(), opt.g_hat(), noise.double()
    return (spearman(pop, problem.energy), spearman(noisy - pop, v),
            spearman(pop / (noisy - pop).clamp_min(1e-9), problem.energy / v), spearman(noisy, problem.energy))


def test_snr_score_separates_population_energy_from_batch_noise():
    """Δ·Δ' (one probe, two batches) regressed on the masks recovers ‖ḡ_b‖², and Δ² minus it the batch noise V_b.
    Mean Spearman over 3 seeds after 6,000 steps, measured: population energy 0.83, noise 0.81, their ratio
    (what sets π) 0.71; Δ² alone ranks ‖ḡ_b‖² at only 0.58 (it holds ‖ḡ_b‖² + V_b): the test has power. At the
    adaptive budget (≈ 0.2 here) each product says little about any one unit: thousands of steps, not tens."""
    rho = torch.tensor([snr_recovery(seed) for seed in (7, 1, 2)]).mean(dim=0).tolist()
    print("snr recovery (pop, noise, ratio, delta^2 alone):", rho)
    assert rho[0] >= 0.7 and rho[1] >= 0.7 and rho[2] >= 0.6 and rho[3] < rho[0] - 0.1, rho


def test_snr_forwards_and_state():
    """4 forwards on two-batch steps (every snr_every-th), 2 otherwise; a state_dict round trip keeps π."""
    problem = TwoBatchQuadratic([1.0, 2.0, 0.5], [1.0, 4.0, 2.0])
    opt = CurvZO(problem.shards, zo_config(lr=0.0, curvzo=CurvZOConfig(score="snr", snr_every=3)), seed=1)
    passes = [opt.step(problem.oracle(s), s)["forward_passes"] for s in range(1, 31)]
    assert all(n == (4 if s % 3 == 0 else 2) for s, n in enumerate(passes, 1) if n != 1), passes
    copy = CurvZO(problem.shards, zo_config(lr=0.0, curvzo=CurvZOConfig(score="snr", snr_every=3)), seed=1)
    copy.load_state_dict(json.loads(json.dumps(opt.state_dict())))
    assert torch.equal(copy.keep_probs(), opt.keep_probs()) and opt.signal.num_obs > 3


class Rows(float):
    """A batch loss that also carries each example's loss, as train's PendingLoss does when asked."""

    per_example: list[float] | None = None


class PerExampleQuadratic(TwoBatchQuadratic):
    """Example i's loss ½Σ h θ² + ξ_iᵀθ with ξ_i ~ N(0, v_b/n_b) per coordinate of unit b, `rows` fresh examples per
    (step, batch), the same for ℓ₊ and ℓ₋: ‖ḡ_b‖² and the per-example noise v_b are known (`noise` is v_b)."""

    def __init__(self, start: list[float], noise: list[float], size: int = 8, rows: int = 16):
        super().__init__(start, noise, size)
        self.rows = rows

    def oracle(self, step: int):
        def loss(batch: int = 0, per_example: bool = False) -> float:
            gen = torch.Generator().manual_seed(1000 * step + batch)
            xi = torch.randn(self.rows, self.theta.numel(), generator=gen, dtype=torch.float64) * self.sd
            each = self.loss() + xi @ self.theta
            out = Rows(float(each.mean()))
            if per_example:
                out.per_example = each.tolist()
            return out
        return loss


def ratio_recovery(score: str, seed: int, steps: int) -> tuple[float, float, float]:
    """Spearman of (P̂ vs ‖ḡ‖², noise estimate vs v, P̂/noise vs ‖ḡ‖²/v) after `steps` steps at lr 0, 16 units."""
    gen = torch.Generator().manual_seed(seed)
    start, noise = torch.randn(16, generator=gen).mul(0.5).exp(), 64 * torch.randn(16, generator=gen).exp()
    problem = PerExampleQuadratic(start.tolist(), noise.tolist())
    opt = CurvZO(problem.shards, zo_config(lr=0.0, curvzo=CurvZOConfig(score=score, snr_every=1)), seed=seed)
    for step in range(1, steps + 1):
        opt.step(problem.oracle(step), step)
    pop = opt.signal.estimate()
    noisy = opt.spread.estimate() if score == "snr_rows" else opt.g_hat() - pop
    v = noise.double()
    return (spearman(pop, problem.energy), spearman(noisy, v),
            spearman(pop / noisy.clamp_min(1e-9), problem.energy / v))


def test_snr_rows_learns_the_ratio_from_the_step_s_own_rows_faster_than_two_batches():
    """score=snr_rows (per-example spread of the two forwards) against score=snr (a second batch every step) at
    equal forward passes (2,000: 1,000 steps against 500), mean Spearman over 3 seeds. Measured (population energy,
    noise, ratio): rows 0.42, 0.98, 0.60; two batches 0.54, 0.47, 0.39. The rows rank the noise almost exactly;
    the ratio is then limited by the population energy, which Δ² still gives slowly (over 6 seeds at 4,000
    forwards the ratio is 0.57 against 0.49)."""
    rows = torch.tensor([ratio_recovery("snr_rows", seed, 1000) for seed in (7, 1, 2)]).mean(dim=0).tolist()
    two = torch.tensor([ratio_recovery("snr", seed, 500) for seed in (7, 1, 2)]).mean(dim=0).tolist()
    print("rows (pop, noise, ratio):", rows, "two batches:", two)
    assert rows[1] >= 0.9 and rows[2] >= 0.5 and rows[2] > two[2] + 0.1, (rows, two)


def test_snr_rows_asks_for_rows_logs_its_two_numbers_and_replays_bitwise():
    """Two forwards a step, both asked for rows; the two statistics go through decide (the seed log), and a replay
    that has only the logged floats (no rows) rebuilds weights and state bit for bit."""
    cfg = zo_config(lr=0.05, curvzo=CurvZOConfig(score="snr_rows", weight_power=0.0))
    trained = PerExampleQuadratic([1.0, 2.0, 0.5, 1.5], [4.0, 1.0, 8.0, 2.0])
    opt = CurvZO(trained.shards, cfg, seed=5)
    log, probes = {}, 0
    for step in range(1, 31):
        oracle, seen, asked = trained.oracle(step), [], []

        def loss_fn(batch=0, per_example=False, oracle=oracle, seen=seen, asked=asked):
            asked.append(per_example)
            seen.append(oracle(batch, per_example))
            return seen[-1]

        loss_fn.decide = lambda values, seen=seen: seen.extend(values) or values
        passes = opt.step(loss_fn, step)["forward_passes"]
        log[step] = [float(x) for x in seen]
        if passes == 2:  # ℓ₊, ℓ₋ (both with rows), then Δ² − s²/B and s²; an empty mask reads one loss
            probes += 1
            assert asked == [True, True] and len(log[step]) == 4, (asked, log[step])
    assert probes >= 20 and opt.spread.num_obs == probes and float(opt.spread.estimate().sum()) > 0
    replayed = PerExampleQuadratic([1.0, 2.0, 0.5, 1.5], [4.0, 1.0, 8.0, 2.0])
    again = CurvZO(replayed.shards, cfg, seed=5)
    for step in range(1, 31):
        values = iter(log[step])
        replay = lambda batch=0, per_example=False, values=values: next(values)  # noqa: E731
        replay.decide = lambda decided, values=values: [next(values) for _ in decided]
        again.step(replay, step)
    assert torch.equal(trained.theta, replayed.theta)
    assert json.dumps(opt.state_dict()) == json.dumps(again.state_dict())


# ------------------------------------------------------------------ issue 14: curvature relative to gradient

CURV = {"sampling": "curv_ratio", "curvature_every": 10, "max_weight": 0.0}


def test_curvature_forward_every_k_steps_and_its_regression_recovers_trace_h():
    """ℓ₀ every K = 2 steps (3 forwards, else 2; 1 when nothing is kept); on a quadratic
    (ℓ₊ + ℓ₋ − 2ℓ₀)/ε² = uᵀHu, whose noise is 2·Σ m_b·‖H_b‖²_F, and its regression on the masks gives
    tr H_b = n_b·h_b to within 0.1 × the largest after 1,600 steps (~750 observations)."""
    sizes, h = [3, 5, 2, 4], [1.0, 0.3, 2.0, 0.05]
    problem = Quadratic(sizes, h)
    cfg = CurvZOConfig(sampling="curv_ratio", curvature_every=2)
    opt = CurvZO(problem.shards, zo_config(lr=0.0, curvzo=cfg), seed=5)
    for step in range(1, 1601):
        record = opt.step(problem.loss, step)
        assert record["forward_passes"] == (1 if record["keep_fraction"] == 0 else 3 if step % 2 == 0 else 2)
    truth = torch.tensor([n * c for n, c in zip(sizes, h)], dtype=torch.float64)
    assert 700 <= opt.curvature.num_obs <= 800  # a step that keeps nothing has no ℓ₀ (1 in 16 here)
    error = (opt.curvature.estimate() - truth).abs().max()
    assert error < 0.1 * float(truth.max()), (opt.curvature.estimate(), truth)


def best_mean_passes(make_opt, make_problem, lrs, seeds, fraction: float, max_steps: int) -> tuple[float, float]:
    """(best mean forward passes to fraction × the start loss over `lrs`, the lr that gave it)."""
    results = []
    for lr in lrs:
        passes = []
        for seed in seeds:
            problem = make_problem()
            passes.append(passes_to_target(make_opt(problem, lr, seed), problem, fraction * problem.loss(), max_steps))
        results.append((sum(passes) / len(passes), lr))
    return min(results)


def mezo(problem, lr, seed):
    return MeZO(problem.shards, zo_config(lr=lr), seed=seed)


def curv_ratio(problem, lr, seed):
    return CurvZO(problem.shards, zo_config(lr=lr, curvzo=CurvZOConfig(**CURV)), seed=seed)


def test_curv_ratio_on_the_f3_quadratic_learns_the_optimal_pi_but_is_stability_limited():
    """The review's F3 structure (a sharp block h = 1 with 1 % of the gradient energy, a flat block h = 1e-3
    holding the rest; 10 coordinates each). At the static F3 point CurvZO learns the sampler the one-step
    formula calls optimal (sharp kept always, flat at π_min; best_sampler: 11.8× dense's one-step decrease).

    Over a trajectory it is not 5× faster. Each at its best lr of {0.1, 0.16}, 2 seeds, to 70 % of the start
    loss: MeZO 2,534 passes, CurvZO curv_ratio 2,166 (both at 0.16; ℓ₀ included): 1.17×. To half the loss,
    1.17× too (MeZO 4,847, CurvZO 4,154); both diverge at 0.2. Both lrs are capped by the sharp block's own
    stability, lr·h·(n + 2) < 2, which no sampler that keeps that block can lift, HT pins the flat block's
    drift to lr·g, and near that cap the ZO noise pumps the sharp block until it holds most of Δ². The
    one-step gain needs an lr 11.8× past the cap. We assert 0.5–2× (if it ever passes 2×, the docs must change)."""
    problem = f3_quadratic(blocks=1, size=10)
    opt = curv_ratio(problem, 0.0, seed=0)  # lr 0: the static F3 point the formula describes
    for step in range(1, 301):
        opt.step(problem.loss, step)
    probs = opt.keep_probs()
    assert float(probs[0]) == 1.0 and float(probs[1]) == pytest.approx(opt.c.pi_min)
    grid, seeds = (0.1, 0.16), (0, 1)
    dense = best_mean_passes(mezo, lambda: f3_quadratic(1, 10), grid, seeds, 0.7, 8000)
    sparse = best_mean_passes(curv_ratio, lambda: f3_quadratic(1, 10), grid, seeds, 0.7, 8000)
    print("f3 passes (mean, lr): mezo", dense, "curv_ratio", sparse)
    assert 0.5 < dense[0] / sparse[0] < 2.0, (dense, sparse)


def test_curv_ratio_on_the_aligned_quadratic_is_within_10_percent_of_mezo():
    """The project's quadratic (10 blocks of 4, h_b = 2^-b, θ = 1: curvature tracks gradient energy, where
    the formula's best sampler is dense). Each at its best lr of {0.08, 0.1, 0.12}, 12 seeds, to 25 % of
    the start loss (~33 steps): measured MeZO 63.7 passes (lr 0.08), CurvZO curv_ratio 66.8 (lr 0.08),
    ℓ₀ passes included. Before its statistics exist curv_ratio keeps every unit with π = 0.98."""
    grid, seeds = (0.08, 0.1, 0.12), range(12)
    dense = best_mean_passes(mezo, lambda: Quadratic([4] * 10, [0.5**i for i in range(10)]), grid, seeds, 0.25, 2000)
    sparse = best_mean_passes(curv_ratio, lambda: Quadratic([4] * 10, [0.5**i for i in range(10)]), grid, seeds,
                              0.25, 2000)
    print("aligned passes (mean, lr): mezo", dense, "curv_ratio", sparse)
    assert sparse[0] <= 1.10 * dense[0], (dense, sparse)


def fixed_f3_sampler(tmp_path, sharp_pi: float):
    """CurvZO on the 10 + 10 block F3 quadratic, α = 0, told the sampler (score=fixed): sharp blocks kept with
    `sharp_pi`, flat blocks always."""
    path = tmp_path / "probs.json"
    path.write_text(json.dumps({f"layers.{i}": sharp_pi if i < 10 else 1.0 for i in range(20)}))
    cfg = CurvZOConfig(score="fixed", probs_file=str(path), weight_power=0.0, max_weight=0.0)
    return lambda problem, lr, seed: CurvZO(problem.shards, zo_config(lr=lr, curvzo=cfg), seed=seed)


def test_a_biased_sampler_that_knows_the_curvature_beats_mezo_5x_on_f3(tmp_path):
    """Where 5× on F3 can come from (issue 14 item 3). HT cannot give it (test above: the sharp blocks'
    own stability caps every unbiased sampler's lr). α = 0 can: E ĝ_b = π_b·g_b/q makes π a block
    preconditioner. Keeping each of the 10 sharp blocks with π = 0.05 (½ a sharp block per step instead of
    10) lifts the stable lr about 10×, and the flat blocks, which hold the loss, take that larger step.

    F3 with 10 sharp + 10 flat blocks of 10, to 70 % of the start loss, 2 seeds, each at its best lr:
    measured MeZO 20,719 passes (lr 0.018; 0.02 diverges), this sampler 3,726 (lr 0.06): 5.6×.
    CurvZO does not learn this sampler from its scalar feedback here: with α = 0 its estimation errors
    become preconditioner errors (one sharp block read as flat: kept always at weight 1/q, the run diverges),
    and the noise of uᵀHu (√(2Σ‖H_b‖²_F) ≈ 10) is 1,000× the flat blocks' traces (docs/optimizers.md)."""
    make = lambda: f3_quadratic(10, 10)  # noqa: E731
    dense = f3_mezo()
    oracle = best_mean_passes(fixed_f3_sampler(tmp_path, 0.05), make, (0.04, 0.06, 0.08), (0, 1), 0.7, 20000)
    print("f3 10+10 passes (mean, lr): mezo", dense, "fixed α=0", oracle)
    assert dense[0] >= 5 * oracle[0], (dense, oracle)
    assert dense[1] < 0.02 and oracle[1] < 0.08  # both optima bracketed: the next lr up is worse


@functools.cache
def f3_mezo() -> tuple[float, float]:
    """MeZO on the 10 + 10 block F3 quadratic to 70 % of the start loss, 2 seeds, best of lr 0.016-0.02
    (measured 20,719 passes at 0.018; 0.02 diverges): shared by the tests that compare with it."""
    return best_mean_passes(mezo, lambda: f3_quadratic(10, 10), (0.016, 0.018, 0.02), (0, 1), 0.7, 20000)


STEP = {"sampling": "curv_step", "curvature_every": 20, "weight_power": 0.0}


def curv_step(problem, lr, seed):
    return CurvZO(problem.shards, zo_config(lr=lr, curvzo=CurvZOConfig(**STEP)), seed=seed)


def test_curv_step_learns_to_leave_the_sharp_units_out_and_beats_mezo_5x_on_f3():
    """Issue 14 item 3 with the curvature learned from ℓ₀ (no oracle). F3, 10 sharp + 10 flat units of 10, to
    70 % of the start loss, 2 seeds. The capped step removes the lr's stability limit, so passes fall with the
    lr (4 seeds, measured: 8,330 at lr 0.3, 3,422 at 1, 510 at 10, 323 at 100): its "best lr" is the cap at
    which the curvature alone sets the step. Measured at 10: 530 passes against MeZO's 20,719 at its best:
    39×. What it learns: every sharp unit at π_min, the flat units at 0.05-1 (mean 0.39; their Ĝ/tr Ĥ is
noisy, and the best is kept always)."""
    make = lambda: f3_quadratic(10, 10)  # noqa: E731
    dense = f3_mezo()
    learned = best_mean_passes(curv_step, make, (1.0, 10.0), (0, 1), 0.7, 20000)
    print("f3 10+10 passes (mean, lr): mezo", dense, "curv_step", learned)
    assert dense[0] >= 5 * learned[0], (dense, learned)
    problem = make()
    opt = curv_step(problem, 10.0, seed=0)
    passes_to_target(opt, problem, 0.7 * problem.loss(), 20000)
    probs = opt.keep_probs()
    assert opt.binding() and torch.all(probs[:10] == opt.c.pi_min), probs
    assert float(probs[10:].mean()) >= 5 * opt.c.pi_min, probs  # measured 0.39: Ĝ of the flat units is noisy


def test_curv_step_on_the_aligned_quadratic_is_mezo_plus_its_l0_forwards():
    """Where curvature tracks gradient energy (the project's quadratic, 10 blocks of 4, h_b = 2^-b) the budget
    does not bind at MeZO's lr and the step is MeZO's, plus an ℓ₀ every 20 steps. Each at its best lr of
    {0.08, 0.1, 0.12}, 12 seeds, to 25 % of the start loss: measured MeZO 63.7 passes, curv_step 67.2 (both
    at lr 0.08): within the asked 10 %."""
    grid, seeds = (0.08, 0.1, 0.12), range(12)
    make = lambda: Quadratic([4] * 10, [0.5**i for i in range(10)])  # noqa: E731
    dense = best_mean_passes(mezo, make, grid, seeds, 0.25, 2000)
    learned = best_mean_passes(curv_step, make, grid, seeds, 0.25, 2000)
    print("aligned passes (mean, lr): mezo", dense, "curv_step", learned)
    assert learned[0] <= 1.10 * dense[0], (dense, learned)


def test_a_capped_step_never_raises_a_quadratics_loss_where_mezo_diverges():
    """At lr 1,000 on F3 (MeZO diverges there within a few steps: checked) every curv_step step after the
    first reads ℓ₀, takes step_scale = κ/(lr·uᵀHu) < 1, and the loss never goes up (the ℓ's of a quadratic
    are exact up to rounding, so the capped step is a descent step along u)."""
    problem = f3_quadratic(10, 10)
    runaway = mezo(problem, 1000.0, seed=0)
    for step in range(1, 6):
        runaway.step(problem.loss, step)
    assert problem.loss() > 1e3 * f3_quadratic(10, 10).loss()
    problem = f3_quadratic(10, 10)
    opt = curv_step(problem, 1000.0, seed=0)
    before = problem.loss()
    for step in range(1, 301):
        record = opt.step(problem.loss, step)
        after = problem.loss()
        assert after <= before * (1 + 1e-12), (step, before, after)
        assert record["forward_passes"] == 3 and record["step_scale"] < 1.0
        before = after
    assert before < 0.5 * f3_quadratic(10, 10).loss()


def test_curv_step_below_its_budget_is_mezo_bitwise():
    """At lr 0.01 on the aligned quadratic (lr·Σ tr H = 0.08 < κ = 1) the masks are dense and the step is not
    capped: the weights equal MeZO's bit for bit after 30 steps, with ℓ₀ (3 forwards) on steps 1, 20."""
    make = lambda: Quadratic([4] * 10, [0.5**i for i in range(10)])  # noqa: E731
    a, b = make(), make()
    ours, ref = curv_step(a, 0.01, seed=5), mezo(b, 0.01, seed=5)
    passes = [ours.step(a.loss, step)["forward_passes"] for step in range(1, 31)]
    for step in range(1, 31):
        ref.step(b.loss, step)
    assert torch.equal(a.theta, b.theta)
    assert [i + 1 for i, n in enumerate(passes) if n == 3] == [1, 20] and not ours.binding()


def test_fixed_probs_are_used_as_given_and_bad_files_are_refused(tmp_path):
    problem = Quadratic([3, 5, 2], [1.0, 1.0, 1.0])
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"layers.0": 0.2, "layers.1": 1.0, "layers.2": 0.01}))
    opt = CurvZO(problem.shards, zo_config(curvzo=CurvZOConfig(score="fixed", probs_file=str(good))), seed=0)
    for step in range(1, 20):
        opt.step(problem.loss, step)
    assert opt.keep_probs().tolist() == [0.2, 1.0, 0.01]  # pi_min does not apply; nothing is learned
    assert opt.budget == pytest.approx((3 * 0.2 + 5 + 2 * 0.01) / 10)
    landscape = tmp_path / "landscape.json"
    landscape.write_text(json.dumps({"landscape": {"layer": {"names": ["layers.0", "layers.1", "layers.2"],
                                                             "fisher": {"best": {"none": {"pi": [1, 0.5, 0.1]}}}}}}))
    opt = CurvZO(problem.shards, zo_config(curvzo=CurvZOConfig(score="fixed", probs_file=str(landscape))), seed=0)
    assert opt.keep_probs().tolist() == [1.0, 0.5, 0.1]
    bad = tmp_path / "bad.json"
    for content, words in (({"layers.0": 0.2}, "missing"), ({"layers.0": 0.2, "layers.1": 0, "layers.2": 1}, "(0, 1]")):
        bad.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=re.escape(words)):
            CurvZO(problem.shards, zo_config(curvzo=CurvZOConfig(score="fixed", probs_file=str(bad))), seed=0)
    with pytest.raises(FileNotFoundError, match="probs_file"):
        CurvZO(problem.shards, zo_config(curvzo=CurvZOConfig(score="fixed", probs_file=str(tmp_path / "no.json"))),
               seed=0)
    tensor = CurvZOConfig(score="fixed", probs_file=str(landscape), granularity="tensor")
    with pytest.raises(ValueError, match="'tensor' units"):
        CurvZO(problem.shards, zo_config(curvzo=tensor), seed=0)


def test_predicted_decrease_matches_the_landscape_formula():
    """block_stats.predicted_decrease (rows of candidate π at once) = measure.landscape.best_decrease."""
    from zofsdp.measure.landscape import Blocks, best_decrease
    from zofsdp.optim.block_stats import predicted_decrease

    gen = torch.Generator().manual_seed(0)
    n = torch.tensor([3.0, 10.0, 1.0, 7.0], dtype=torch.float64)
    trace, energy = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.1 for _ in range(2))
    pi = torch.rand(5, 4, generator=gen, dtype=torch.float64).clamp_min(0.05)
    for alpha in (1.0, 0.5, 0.0):
        ours = predicted_decrease(pi, n, trace, energy, alpha)
        theirs = torch.stack([best_decrease(Blocks.of(n, trace, energy), row, alpha) for row in pi])
        assert torch.allclose(ours, theirs, rtol=1e-12)


# ------------------------------------------------------------------ issue 14: weight exponent and clip


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_weight_power_targets_pi_to_the_one_minus_alpha_times_g(alpha):
    """α < 1: E ĝ_b = q^(α−1)·π_b^(1−α)·g_b (q = budget): χ² against that target passes, against g fails."""
    problem = Quadratic([2] * 6, GEOMETRIC)
    cfg = zo_config(lr=1.0, curvzo=CurvZOConfig(budget_init=0.3, adaptive_budget=False, max_weight=0,
                                                weight_power=alpha))
    opt = CurvZO(problem.shards, cfg, seed=2)
    probs = []
    draws = estimates(opt, problem, 2000, on_step=lambda o: probs.append(o.keep_probs().repeat_interleave(2)))
    pi = torch.stack(probs)
    target = (0.3 ** (alpha - 1) * pi.pow(1 - alpha) * problem.grad()).mean(dim=0)
    d = draws.shape[1]
    limit = d + 5 * math.sqrt(2 * d)
    assert chi_square(draws, target) < limit
    assert chi_square(draws, problem.grad()) > 2 * limit


def test_max_weight_clips_the_update_weight():
    problem = Quadratic([2] * 4, [1.0] * 4)
    opt = CurvZO(problem.shards, zo_config(curvzo=CurvZOConfig(max_weight=4.0, budget_init=0.3,
                                                               adaptive_budget=False)), seed=0)
    probs = torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=torch.float64)
    assert opt.update_weights(probs) == [4.0, 4.0, 2.0, 1.0]
    opt.c.weight_power = 0.0  # α = 0: every kept block weighted 1/q (the lr's meaning kept)
    assert opt.update_weights(probs) == pytest.approx([1 / 0.3] * 4)


# ------------------------------------------------------------------ issue 14: replay and resume stay exact

STATEFUL = [{"sampling": "curv_ratio", "curvature_every": 2, "max_weight": 0.0}, {"preset": "released"},
            {"score": "ema", "weight_power": 0.5},
            {"sampling": "curv_step", "curvature_every": 4, "weight_power": 0.0, "curvature_budget": 0.2}]


@pytest.mark.parametrize("rules", STATEFUL)
def test_replay_of_logged_losses_and_resume_from_state_are_bitwise(rules):
    """Every new rule's state (both regressions' normal equations, ℓ₀-derived values, the released rule's
    scores and k) evolves only from the logged losses: replaying them gives the same weights and state bit
    for bit, and a state_dict loaded after step 12 gives the same steps 13–20 as the run that wrote it."""
    import json

    def run(steps, opt, problem, log=None):
        for step in steps:
            oracle = iter(log[step]).__next__ if log is not None else problem.loss
            seen = []
            opt.step(lambda oracle=oracle, seen=seen: seen.append(oracle()) or seen[-1], step)
            yield step, seen

    cfg = zo_config(lr=0.05, curvzo=CurvZOConfig(**rules))
    trained = Quadratic([3, 5, 2, 4, 6], [1.0, 0.3, 2.0, 0.05, 0.5])
    opt = CurvZO(trained.shards, cfg, seed=3)
    log = dict(run(range(1, 21), opt, trained))
    assert any(len(v) == 3 for v in log.values()) == bool(rules.get("curvature_every"))
    replayed = Quadratic([3, 5, 2, 4, 6], [1.0, 0.3, 2.0, 0.05, 0.5])
    again = CurvZO(replayed.shards, cfg, seed=3)
    for _ in run(range(1, 21), again, replayed, log):
        pass
    assert torch.equal(trained.theta, replayed.theta)
    assert json.dumps(opt.state_dict()) == json.dumps(again.state_dict())

    first = Quadratic([3, 5, 2, 4, 6], [1.0, 0.3, 2.0, 0.05, 0.5])
    a = CurvZO(first.shards, cfg, seed=3)
    for _ in run(range(1, 13), a, first):
        pass
    second = Quadratic([3, 5, 2, 4, 6], [1.0, 0.3, 2.0, 0.05, 0.5])
    second.load(first.flat())
    b = CurvZO(second.shards, cfg, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert dict(run(range(13, 21), a, first)) == dict(run(range(13, 21), b, second))
    assert torch.equal(first.theta, second.theta) and torch.equal(first.theta, trained.theta)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("weight_power", 0.7, "weight_power"), ("max_weight", 0.5, "max_weight"), ("curvature_every", -1, "curvature_every"),
    ("forget", 0.0, "forget"), ("preset", "paper", "preset"), ("score", "median", "score"),
    ("score", "fixed", "probs_file"), ("probs_file", "p.json", "probs_file")])
def test_bad_curvzo_settings_are_refused_naming_the_field(field, value, words):
    from zofsdp.config import load_config

    with pytest.raises(ValueError, match=words):
        load_config(None, [f"zo.curvzo.{field}={value}"])
    with pytest.raises(ValueError, match="curvature_every > 0"):
        load_config(None, ["zo.curvzo.sampling=curv_ratio"])
    with pytest.raises(ValueError, match="weight_power=0"):
        load_config(None, ["zo.curvzo.sampling=curv_step", "zo.curvzo.curvature_every=10"])
    with pytest.raises(ValueError, match="snr_every"):
        load_config(None, ["zo.curvzo.snr_every=0"])
    with pytest.raises(ValueError, match="curvature_budget"):
        load_config(None, ["zo.curvzo.curvature_budget=0"])
