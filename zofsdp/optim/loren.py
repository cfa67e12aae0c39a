"""LOREN: ZO with low-rank curvature preconditioning and an RLOO estimator (Seung et al., "Low-Rank
Curvature for Zeroth-Order Optimization in LLM Fine-Tuning", arXiv 2511.07971; code hseung88/loren@b80a32b,
model/glue_transformer_loren.py; specification in OPTIMIZERS-NEXT.md section 2).

Per tensor W viewed as (out, in) (a 1-D tensor as (1, n)), with a ∈ R^in replicated on every rank and
a_flat[i·in + j] = a[j] (one rank-1 term over the whole flattened tensor, as the code):
    s = out·‖a‖², r = √(λ + s), β = (√λ + r)/(s·r), p = a_flat·u = a·colsum(u)
    x = u − β·p·a_flat = M·u  with  M² = (I + a_flat a_flatᵀ/λ)⁻¹
One step, K forwards (no baseline forward): f_k = L(θ + ε·x_k), u_k = z(step, k); w_k = f_k − mean(f).
Estimator (RLOO): ĝ = Σ_k w_k·x_k / (ε(K − 1)); unbiased for M²∇L on a linear L (tests/unit/test_loren.py).
The update is the code's loop, for k = 1..K in order, with a as already updated by k − 1 (the code's
"stale a" quirk, kept):
    g = w_k·x_k/(ε(K−1)); on ≥2-D tensors m ← β1·m + g, g = m; θ ← θ(1 − ηλ_wd) − η·g
    ga = w_k·ε²/r·[p·colsum(u_k) − out·(1 + β(p² − s))·a] / (K − 1);  a ← a(1 − η_a·λ_wd) − η_a·ga
Decided, not copied: 1-D tensors get the n-vector gradient of a (the code sums it to a scalar it
broadcasts; OPTIMIZERS-NEXT.md 2.1 quirk 3); a, m, colsums and dots in fp32 (colsums summed in fp64, so
that a sharded run and its one-process replay agree); weight decay on θ follows zo.weight_decay's rule
(weight matrices only), a decays as the code.

Sharding: colsum(u_k) is the only non-local quantity. All K of them are accumulated locally (one noise
pass per query, before the forwards) and summed over ranks in ONE all-reduce of K·Σ in float64s per step;
everything else is per element or uses the replicated a. Momentum is sharded like the weights (4 bytes per
element of ≥2-D tensors). Needs fp32 shards (no probe) and the tensors' full shapes.
"""

from __future__ import annotations

import math

import torch

from zofsdp.noise import Shard, block_id, mix_seed
from zofsdp.optim.base import LossFn, ZOOptimizer


def row_length(shape: tuple[int, ...]) -> int:
    """`in` of the (out, in) view: the product of the trailing dims; a 1-D tensor is one row."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def coefficients(a: torch.Tensor, out: int, damping: float) -> tuple[float, float]:
    """(s, r, β) of sqrt_cov for a tensor with `out` rows, in float64 on the host (identical on every rank)."""
    s = out * float(a.double().square().sum())
    r = math.sqrt(damping + s)
    return s, r, (math.sqrt(damping) + r) / (s * r)


class Loren(ZOOptimizer):
    def __init__(self, shards: list[Shard], cfg, seed: int, device="cpu", probe=None, shapes=None, **kw):
        if probe is not None:
            raise ValueError("zo.optimizer=loren perturbs by ε(u − βp·a) and keeps momentum sharded like the "
                             "weights: it needs fp32 shards (model.dtype=float32; compute_dtype may be bf16)")
        super().__init__(shards, cfg, seed, device, **kw)
        if shapes is None:
            raise ValueError("zo.optimizer=loren needs the tensors' full shapes (build_optimizer(shapes=...))")
        self.c = cfg.loren
        self.shapes = {name: tuple(shapes[name]) for name, _, _ in self.blocks}
        self.width = {n: row_length(sh) for n, sh in self.shapes.items()}
        self.a = {n: self._init_a(n) for n in self.shapes}
        """a per tensor (every tensor, owned rows or not): replicated, identical on every rank."""
        self.momentum = [torch.zeros_like(s.data, dtype=torch.float32) if len(self.shapes[s.name]) >= 2
                         else None for s in shards]

    def _init_a(self, name: str) -> torch.Tensor:
        """randn(in) as the code, from our seed and the tensor's name (the same on every rank)."""
        g = torch.Generator(device="cpu").manual_seed(mix_seed(self.seed, 0x10AE, block_id(name)))
        return torch.randn(self.width[name], generator=g, dtype=torch.float32).to(self.noise.device)

    def _rows(self, name: str) -> int:
        return math.prod(self.shapes[name]) // self.width[name]

    def _cols(self, i: int, view: torch.Tensor) -> torch.Tensor:
        """col(idx) = global flat index mod in, for the elements of a shard's view."""
        s = self.shards[i]
        lo = s.global_start + view.storage_offset() - s.data.storage_offset()
        return torch.arange(lo, lo + view.numel(), device=view.device) % self.width[s.name]

    def colsums(self, step: int) -> dict[str, torch.Tensor]:
        """colsum(u_k) per tensor as a [K, in] fp32 tensor, summed over ranks in one all-reduce."""
        k_max, names = self.c.num_queries, list(self.shapes)
        offsets = dict(zip(names, [0, *torch.tensor([self.width[n] for n in names]).cumsum(0).tolist()]))
        total = sum(self.width.values())
        buffer = torch.zeros(k_max, total, dtype=torch.float64, device=self.noise.device)
        for k in range(k_max):
            def add(lane, i, view, z, k=k):
                start = offsets[self.shards[i].name]
                buffer[k].index_add_(0, self._cols(i, view) + start, z.double())
            self.noise._run(self.shards, (step, k), add)
        buffer = self.all_reduce(buffer).float()
        return {n: buffer[:, offsets[n]:offsets[n] + self.width[n]] for n in names}

    def shift(self, key: tuple[int, ...], scale: float, coef: dict[str, float]) -> None:
        """θ += d(scale·(u − βp·a[col])) with coef[name] = βp; −scale restores the very bits (noise._Lane.step)."""
        def apply(lane, i, view, z):
            name = self.shards[i].name
            x = z - coef[name] * self.a[name][self._cols(i, view)]
            view.add_(lane.step(x, scale))
        self.noise._run(self.shards, key, apply)

    def step(self, loss_fn: LossFn, step: int) -> dict:
        eps, k_max = self.cfg.eps, self.c.num_queries
        cols = self.colsums(step)
        losses = []
        for k in range(k_max):  # a does not change here: every perturbation is undone exactly
            coef = {n: self._beta_p(n, cols[n][k])[1] for n in self.shapes}
            self.shift((step, k), eps, coef)
            losses.append(loss_fn())
            self.shift((step, k), -eps, coef)
        record = {"forward_passes": k_max, "loss": sum(losses) / k_max if self.finite(*losses) else float("nan")}
        if not self.finite(*losses):
            return {**record, "projected_grad": float("nan"), "skipped": True}
        mean = math.fsum(losses) / k_max
        weights = [f - mean for f in losses]
        for k, w in enumerate(weights):  # the code's order: θ and m with the current a, then a
            self.update_pass((step, k), w, cols)
        return {**record, "loss": mean, "projected_grad": weights[0] / eps}  # logged only: w_1/ε

    def _beta_p(self, name: str, colsum: torch.Tensor) -> tuple[tuple[float, float, float], float, float]:
        """((s, r, β), βp, p) for the current a."""
        s_r_b = coefficients(self.a[name], self._rows(name), self.c.damping)
        p = float(self.a[name].double() @ colsum.double())
        return s_r_b, s_r_b[2] * p, p

    def update_pass(self, key: tuple[int, ...], w: float, cols: dict[str, torch.Tensor]) -> None:
        """One query's update: θ (with momentum on ≥2-D tensors), then a, from the current a."""
        eps, lr, wd, k_max, k = self.cfg.eps, self.cfg.lr, self.cfg.weight_decay, self.c.num_queries, key[1]
        info = {n: self._beta_p(n, cols[n][k]) for n in self.shapes}
        scale = w / (eps * (k_max - 1))

        def apply(lane, i, view, z):
            shard = self.shards[i]
            x = (z - info[shard.name][1] * self.a[shard.name][self._cols(i, view)]).mul_(scale)
            m = self.momentum[i]
            if m is not None:
                lo = view.storage_offset() - shard.data.storage_offset()
                x = m[lo:lo + view.numel()].mul_(self.c.momentum).add_(x)
            if wd and shard.decay:
                view.mul_(1 - lr * wd)
            view.add_(x, alpha=-lr)

        self.noise._run(self.shards, key, apply)
        for n, ((s, r, beta), _, p) in info.items():
            self.a[n] = self.a_step(self.a[n], cols[n][k], w, s, r, beta, p, self._rows(n))

    def a_step(self, a, colsum, w, s, r, beta, p, rows) -> torch.Tensor:
        """a(1 − η_a·λ_wd) − η_a·ga, ga the code's row-summed score-function term (fp32)."""
        eps, k_max, lr_a, wd = self.cfg.eps, self.c.num_queries, self.c.lr_cov, self.cfg.weight_decay
        ga = (colsum * p - a * (rows * (1 + beta * (p * p - s)))).mul_(w * eps * eps / (r * (k_max - 1)))
        return a.mul(1 - lr_a * wd).sub_(ga, alpha=lr_a)

    def state_shards(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """(name, local fp32 momentum, global flat start, full numel) per ≥2-D shard (`loren.momentum.<p>`)."""
        return [(f"loren.momentum.{s.name}", m, s.global_start, s.full_numel)
                for s, m in zip(self.shards, self.momentum) if m is not None]

    def state_dict(self) -> dict:
        """a as lists of floats (JSON; fp32 → float → fp32 is exact); momentum goes to `state_shards()`."""
        return {"optimizer": "loren", "sharded_state": ["momentum"], "a": {n: a.tolist() for n, a in self.a.items()}}

    def load_state_dict(self, state: dict) -> None:
        """a from the state; momentum must have been read into `state_shards()` (`sharded_state_loaded`)."""
        saved = self.check_state(state, "a", list(self.a))
        if not state.get("sharded_state_loaded"):
            raise ValueError("loren's momentum (4 bytes per weight-matrix parameter, sharded) is not in this "
                             "checkpoint: it cannot be resumed exactly; start afresh or use one that holds it")
        self.a = {n: torch.tensor(saved[n], dtype=torch.float32, device=self.noise.device) for n in self.a}
