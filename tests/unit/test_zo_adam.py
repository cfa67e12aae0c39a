"""ZO-Adam: torch.optim.Adam fed the same estimates, the first step, shard-layout independence, state."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.unit.sparse_problems import Quadratic, zo_config
from zofsdp.config import ZOAdamConfig
from zofsdp.noise import Shard, block_id
from zofsdp.optim.zo_adam import ZOAdam


def quadratic() -> Quadratic:
    problem = Quadratic([700, 300], [1.0, 5.0], dtype=torch.float32)
    problem.load(problem.flat() * 1.5)  # inside [1, 2): no probe crosses a power of two, restores are exact
    return problem


def test_equals_torch_adam_fed_the_same_estimates():
    """20 steps: the reference is torch.optim.Adam (single-tensor, fp32) whose .grad is set to ĝ_t = g_t·z_t
    (g_t from our step, z_t regenerated), from the same start. The moments agree bit for bit; the weights to
    the few fp32 ulps the in-place restore loses where a probe is below θ's ulp·2^15 (noise._Lane.step)."""
    problem = quadratic()
    reference = torch.nn.Parameter(problem.flat())
    adam = torch.optim.Adam([reference], lr=1e-3, betas=(0.8, 0.99), eps=1e-6, foreach=False)
    opt = ZOAdam(problem.shards, zo_config(lr=1e-3, zo_adam=ZOAdamConfig(beta1=0.8, beta2=0.99, adam_eps=1e-6)),
                 seed=3)
    for step in range(1, 21):
        g = opt.step(problem.loss, step)["projected_grad"]
        z = torch.cat([opt.noise.slice(s, (step, 0)) for s in opt.shards])
        reference.grad = g * z
        adam.step()
    ulp = 2.0**-23 * 1.5
    assert (problem.flat() - reference.detach()).abs().max() <= 4 * ulp
    assert (problem.flat() - reference.detach()).abs().max() < 1e-3 * (problem.flat() - quadratic().flat()).abs().max()
    assert not torch.equal(problem.flat(), quadratic().flat())
    moments = torch.cat(opt.exp_avg), torch.cat(opt.exp_avg_sq)
    assert torch.equal(moments[0], adam.state[reference]["exp_avg"])
    assert torch.equal(moments[1], adam.state[reference]["exp_avg_sq"])


def test_first_step_is_minus_lr_times_sign():
    problem = quadratic()
    theta = problem.flat()
    opt = ZOAdam(problem.shards, zo_config(lr=1e-4), seed=0)
    g = opt.step(problem.loss, 1)["projected_grad"]
    z = torch.cat([opt.noise.slice(s, (1, 0)) for s in opt.shards])
    assert torch.allclose(problem.flat() - theta, -1e-4 * torch.sign(g * z), rtol=1e-3, atol=1e-7)


def test_same_update_whatever_the_shard_layout():
    """Moments are sharded like the parameters: one shard of 3000 elements or two uneven pieces of the
    same tensor (global starts 0 and 1700) give the same weights and moments, bit for bit."""
    results = []
    for bounds in ([0, 3000], [0, 1700, 3000]):
        theta = torch.full((3000,), 1.5)
        shards = [Shard("w", theta[a:b], a, 3000, block_id("w"), True, "layers.0") for a, b in itertools.pairwise(bounds)]
        opt = ZOAdam(shards, zo_config(lr=1e-3, weight_decay=0.1), seed=5,
                     blocks=[("w", 3000, "layers.0")])
        h = torch.linspace(0.5, 2, 3000)
        for step in range(1, 6):
            opt.step(lambda h=h, theta=theta: float((h * theta.double() ** 2).sum() / 2), step)
        results.append((theta, torch.cat(opt.exp_avg), torch.cat(opt.exp_avg_sq)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_state_is_two_fp32_copies_of_the_shards_and_refuses_a_checkpoint_without_them():
    problem = quadratic()
    opt = ZOAdam(problem.shards, zo_config(lr=1e-3), seed=0)
    numel = sum(s.numel for s in problem.shards)
    assert sum(t.numel() * t.element_size() for _, t, _, _ in opt.state_shards()) == 8 * numel
    opt.step(problem.loss, 1)
    state = opt.state_dict()
    other = ZOAdam(problem.shards, zo_config(lr=1e-3), seed=0)
    with pytest.raises(ValueError, match="moments"):
        other.load_state_dict(state)
    other.load_state_dict({**state, "sharded_state_loaded": True})
    assert other.num_updates == 1


def test_non_finite_loss_restores_skips_and_does_not_count():
    problem = quadratic()
    theta = problem.flat()
    opt = ZOAdam(problem.shards, zo_config(lr=0.1), seed=0)
    losses = iter([float("inf"), 1.0])
    assert opt.step(lambda: next(losses), 1)["skipped"]
    assert (problem.flat() - theta).abs().max() <= 2.0**-23 * 1.5 and opt.num_updates == 0
