"""AdaLeZO: adaptive layer-wise sampling for ZO optimization ("Universally Empowering Zeroth-Order
Optimization via Adaptive Layer-wise Sampling", arXiv 2604.18264, 2026), on top of the MeZO two-point probe.

Which layers to perturb is a non-stationary multi-armed bandit. Arms are layers: `embed`, `layers.<i>`,
`head` (`Shard.group`). Each step draws k = ⌈ρ·N⌉ arms with replacement from
p = (1−γ)·softmax(R̃/τ) + γ/N, from a generator seeded by (run seed, step): every rank draws the same arms.
c_l counts the draws of arm l. Only drawn layers are perturbed: u = Σ_{l drawn} z_l (each drawn layer once),
Δ = (L(θ+εu) − L(θ−εu))/(2ε), and layer l's estimate is ĝ_l = w_l·Δ·z_l with w_l = c_l/(k·p_l).
Unbiased: E[Δ·z_l | drawn set] = ∇_l L for a drawn l and E[c_l] = k·p_l, so E[ĝ_l] = ∇_l L (up to O(ε²)).
Undrawn layers generate no noise and are never written.

Details the paper leaves open, and what we chose (docs/optimizers.md has the reasoning):
- Reward of a drawn arm: Δ², the squared projected gradient (the directional second moment the arm took
  part in). All drawn arms of a step share it; an arm whose gradient is large raises Δ² whenever drawn.
- Rewards enter the softmax normalised by their maximum, R̃ = R / max R ∈ [0, 1]: Δ² shrinks by orders of
  magnitude during training, and without normalisation τ would mean something different every hundred
  steps. The most and least favoured arms' probabilities then differ by at most e^{1/τ} before mixing.
- R_l ← α·R_l + (1−α)·Δ² for drawn arms; undrawn arms keep R_l (the γ/N floor revisits them). The first
  reward of an arm replaces its zero start; arms never drawn borrow the mean of the others.
- The weight w_l is clipped at `max_weight` (default 10; 0 = off): a rarely drawn arm (p_l ≈ γ/N) would
  otherwise get w ≈ N/(γ·k) and one noisy Δ could throw its layer far off. The clip is a bias (the clipped
  arm is under-weighted) traded for bounded variance; turn it off for the unbiased estimator.

`adalezo.preset=public` follows the public AdaLeZOTrainer instead, for faithfulness comparisons: k = max(1, ⌊ρN⌋),
reward |Δ| in an EMA that starts at 0 for every arm (unseen arms are not lifted to the mean), and the clip on
1/(k·p) before multiplying by c: w_l = min(1/(k·p_l), clip)·c_l. Its expected weight is E[w_l] = min(1, clip·k·p_l)
(E c_l = k p_l), so arms with p_l < 1/(clip·k) are under-weighted in proportion to p_l: a layer preconditioner
that favours high-reward layers, not an unbiased estimate. It resamples every step (the code's interval 1).

Plug-in: `LayerBandit` holds nothing but the arms' rewards and the seeded draw; another optimizer can draw
arms from it, perturb only those layers, scale its per-layer estimate by `weights(counts)` and feed the
reward of its projected gradient (`reward`) back with `update`. AdaLeZO is that recipe applied to MeZO.
"""

from __future__ import annotations

import math

import torch

from zofsdp.noise import Shard
from zofsdp.optim.base import LossFn, ZOOptimizer
from zofsdp.optim.sampling import BlockSpec, build_units, generator

ARM_TAG = 0xADA1E  # separates the arm draws from the noise streams and CurvZO's masks


class LayerBandit:
    """Layers as arms: seeded draws with replacement, inverse-probability weights, EMA rewards."""

    def __init__(self, blocks: list[BlockSpec], cfg, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.units = build_units(blocks, "layer")
        n = len(self.units.names)
        self.public = cfg.preset == "public"
        self.k = max(1, int(cfg.rho * n)) if self.public else math.ceil(cfg.rho * n)
        self.rewards = torch.zeros(n, dtype=torch.float64)
        self.num_drawn = torch.zeros(n, dtype=torch.int64)

    def probs(self) -> torch.Tensor:
        r = self.rewards.clone()
        seen = self.num_drawn > 0
        if bool(seen.any()) and not self.public:
            r[~seen] = r[seen].mean()
        top = float(r.max())
        r = r / top if top > 0 else torch.zeros_like(r)
        n = r.numel()
        return (1 - self.cfg.gamma) * torch.softmax(r / self.cfg.tau, dim=0) + self.cfg.gamma / n

    def draw(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        """c: how many of the k draws fell on each arm."""
        picks = torch.multinomial(probs, self.k, replacement=True, generator=generator(self.seed, step, ARM_TAG))
        return torch.bincount(picks, minlength=probs.numel())

    def weights(self, counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        clip = self.cfg.max_weight if self.cfg.max_weight > 0 else math.inf
        if self.public:  # clip one draw's weight, then count the draws
            return (1 / (self.k * probs)).clamp(max=clip) * counts.double()
        return (counts.double() / (self.k * probs)).clamp(max=clip)

    def reward(self, projected_grad: float) -> float:
        return abs(projected_grad) if self.public else projected_grad * projected_grad

    def update(self, counts: torch.Tensor, reward: float) -> None:
        """EMA of the drawn arms' rewards; ours lets an arm's first reward replace its zero start, public does not."""
        drawn = counts > 0
        first, again = drawn & (self.num_drawn == 0), drawn & (self.num_drawn > 0)
        if self.public:
            first, again = torch.zeros_like(drawn), drawn
        self.rewards[first] = reward
        self.rewards[again] = self.cfg.alpha * self.rewards[again] + (1 - self.cfg.alpha) * reward
        self.num_drawn += drawn.long()

    def state_dict(self) -> dict:
        probs = self.probs().tolist()
        return {name: {"reward": r, "prob": p, "num_drawn": c} for name, r, p, c in
                zip(self.units.names, self.rewards.tolist(), probs, self.num_drawn.tolist())}


class AdaLeZO(ZOOptimizer):
    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", blocks: list[BlockSpec] | None = None,
                 **precision):
        super().__init__(shards, cfg, seed, device, blocks=blocks, **precision)
        self.bandit = LayerBandit(self.blocks, cfg.adalezo, seed)

    def step(self, loss_fn: LossFn, step: int) -> dict:
        eps, key, units = self.cfg.eps, (step, 0), self.bandit.units
        probs = self.bandit.probs()
        counts = self.bandit.draw(probs, step)
        weight = self.bandit.weights(counts, probs).tolist()
        drawn = [s for s in self.shards if counts[units.unit_of[s.name]] > 0]
        names = [n for n, _, _ in self.blocks if counts[units.unit_of[n]] > 0]  # all ranks' tensors
        record = {"keep_fraction": units.fraction(counts > 0),
                  "num_layers_drawn": int((counts > 0).sum()), "forward_passes": 2}
        self.perturb(drawn, key, +eps, names)
        loss_plus = loss_fn()
        self.perturb(drawn, key, -2 * eps, names)
        loss_minus = loss_fn()
        if not self.finite(loss_plus, loss_minus):
            self.perturb(drawn, key, +eps, names)  # restore only; rewards untouched
            return {"loss": float("nan"), "projected_grad": float("nan"), **record, "skipped": True}
        g = (loss_plus - loss_minus) / (2 * eps)
        self.restore_and_update(drawn, key, eps, lambda s: g * weight[units.unit_of[s.name]])
        self.bandit.update(counts, self.bandit.reward(g))
        return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": g, **record}

    def state_dict(self) -> dict:
        return {"optimizer": "adalezo", "k": self.bandit.k, "arms": self.bandit.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Back to the rewards and draw counts of `state_dict` (a checkpoint); probabilities follow from them."""
        arms = self.check_state(state, "arms", self.bandit.units.names)
        names = self.bandit.units.names
        self.bandit.rewards = torch.tensor([arms[n]["reward"] for n in names], dtype=torch.float64)
        self.bandit.num_drawn = torch.tensor([arms[n]["num_drawn"] for n in names], dtype=torch.int64)
