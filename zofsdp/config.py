"""Typed run configuration: one dataclass per component, loaded from YAML plus dotted overrides.

Every section is a plain dataclass; `load_config` walks the YAML mapping against the dataclass fields,
so a misspelt key fails at once with the list of keys that would have been valid there.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DTYPES = ("float32", "bfloat16", "float16")


def default_data_dir() -> str:
    """`../shared/data` beside the checkout when it exists (offline task data), else "" (the hub)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return str(candidate)
    return ""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name_or_path: str = "smollm2-135m"
    """Hub id, local folder, a .gguf file, `smollm2-135m` (the embedded default), `tiny-llama`/`tiny-opt`, or an
    architecture JSON (configs/models/*.json: random weights, for measuring memory and speed)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the stored weights (the shards), where updates accumulate. bf16/fp16 shards are never
    perturbed in place: the forwards perturb the gathered copy and updates round stochastically."""
    compute_dtype: Literal["", "float32", "bfloat16", "float16"] = ""
    """Dtype of the forward; "" = model.dtype. float32 shards with bfloat16 compute is mixed precision
    (FSDP2 MixedPrecisionPolicy, DeepSpeed torch_autocast, autocast on one process): exact probes."""
    update_rounding: Literal["stochastic", "nearest"] = "stochastic"
    """How updates are rounded into bf16/fp16 shards; nearest drops most updates below half an ulp."""
    perturb: Literal["auto", "shards", "gathered"] = "auto"
    """Where a probe's εz goes. `gathered`: forward pre-hooks add it to each gathered (or, on one process,
    copied) tensor, the shards are never perturbed, so the restore is exact; the price is noise for every
    gathered tensor on every rank in both forwards, (2·ws + 1)/3 × the in-place noise (measured on CPU,
    SmolLM2-135M, FSDP2 × 2, mixed: 1.33× the median step time; docs/memory.md). `shards`: in
    place, fp32 shards only (after 1,000 probes ~28 % of weights differ by ≤ 1.5e-8). `auto`: gathered for
    bf16/fp16 shards and for mixed precision, shards otherwise and for hizoo/loren (see IN_PLACE_ONLY)."""
    tokenizer: str = ""
    """Tokenizer folder or hub id; "" = the model's own (SmolLM2's for tiny models and architecture JSONs,
    which have none). Set it to run random-weight models where the embedded SmolLM2 is not installed."""
    cache_dir: str = ""
    """Where converted checkpoints are kept; default $ZOFSDP_CACHE or ~/.cache/zofsdp."""
    max_length: int = 256
    """Prompts longer than this are truncated from the left (the answer position is at the end)."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    task: str = "sst2"
    """Task name; see `zofsdp.tasks.TASKS`."""
    dir: str = field(default_factory=default_data_dir)
    """Folder with the task files (layout of ../shared/data); empty = load from the Hugging Face hub."""
    num_train: int = 1000
    """Training examples sampled from the task's train split (MeZO: 1000)."""
    num_dev: int = 500
    """Dev examples sampled from the train split, disjoint from the training ones (MeZO: 500)."""
    num_eval: int = 1000
    """Evaluation examples from the task's validation split (all of it when smaller)."""
    eval_split: Literal["dev", "eval"] = "eval"
    """Which held-out set `train.eval_every` and `zofsdp eval` score."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    """Global batch: split across ranks, the mean loss all-reduced."""
    eval_every: int = 0
    """Evaluate every N steps; 0 = only before and after training."""
    eval_steps: list[int] = field(default_factory=list)
    """Also evaluate after these steps, e.g. [5, 10, 20, 40] for dense early points on a learning curve."""
    eval_batch_size: int = 32
    seed: int = 0
    output_dir: str = "runs/default"
    overwrite: bool = False
    """Replace a finished run (output_dir/model) in output_dir; without it such a folder is refused."""
    save_model: bool = True
    """Write the model (safetensors, each rank writing its part) to output_dir/model at the end."""
    save_dtype: Literal["", "float32", "bfloat16", "float16"] = ""
    """Dtype of the saved weights; empty = model.dtype (e.g. bfloat16 halves an fp32 run's export)."""
    log_every: int = 1
    dump_state_every: int = 0
    """Write the optimizer's state (block scores, rewards) as JSON every N steps; 0 = never."""
    checkpoint_every: int = 0
    """Write a sharded checkpoint (output_dir/checkpoints, each rank its own shards) every N steps and at the
    end; 0 = only when SIGTERM or SIGUSR1 asks the run to stop (docs/checkpointing.md)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep; older ones are deleted once a new one is complete."""
    resume: str = ""
    """`auto`: go on from the newest complete checkpoint in output_dir (a fresh start if there is none);
    a checkpoint folder or another run's output_dir: go on from there; empty: start fresh."""


@dataclass(kw_only=True, slots=True)
class CurvZOConfig:
    """CurvZO (zofsdp/optim/curvzo.py; choices explained in docs/optimizers.md)."""

    budget_min: float = 0.1
    """Smallest expected fraction of parameters perturbed per step."""
    budget_max: float = 0.5
    """Largest expected fraction of parameters perturbed per step."""
    budget_init: float = 0.3
    """Budget of the first step (and the fixed budget when adaptive_budget is false)."""
    pi_min: float = 0.05
    """Every block is kept with probability at least this (keeps it explorable, bounds the variance)."""
    ema: float = 0.9
    """EMA rate of the curvature scores (weight of the old score)."""
    unkept_decay: float = 0.01
    """Per step, an unkept block's score moves this fraction of the way toward the mean score."""
    score_scaling: Literal["ht", "none"] = "ht"
    """Score s_b = Δ²/π_b² (`ht`: the HT-scaled direction, as the paper) or Δ² (`none`)."""
    budget_ema: float = 0.9
    """EMA rate of the budget toward its target (weight of the old budget)."""
    adaptive_budget: bool = True
    """Move the budget with the flatness of the scores; false keeps budget_init."""
    granularity: Literal["tensor", "layer"] = "layer"
    """A block is one parameter tensor, or one layer group (`embed`, `layers.<i>`, `head`)."""
    score: Literal["regression", "ema", "uniform", "fixed", "snr", "snr_rows"] = "regression"
    """How block scores are learned: `regression` estimates G_b = ‖g_b‖² by least squares of Δ² on the masks;
    `ema` is the old kept-only EMA of Δ²/π² (uninformative: kept for comparison); `uniform` learns nothing,
    π = budget_init everywhere and the budget fixed (the uniform-sparse control); `fixed` learns nothing
    either and keeps each unit with the probability that `probs_file` gives it; `snr` scores every
    `snr_every`-th probe on a second batch too (2 more forwards) and samples π ∝ Ĝ_b/V̂_b, population gradient
    energy over batch noise (the landscape oracle's G/Fisher ranking, learned from the losses); `snr_rows`
    samples by the same ratio from every step's own two forwards, reading each example's loss: the spread of
    the per-example differences gives the noise (global-batch more floats per all-reduce, no extra forward)."""
    snr_every: int = 4
    """score=snr: every this many steps the probe is also scored on the step's extra batch 1."""
    probs_file: str = ""
    """score=fixed: a JSON file of keep probabilities, either {"unit name": π} naming every unit (π in (0, 1];
    pi_min does not apply), or a `zofsdp bench --sections landscape` JSON, whose best sampler (Fisher
    traces, no budget) for this granularity is used: the oracle control of docs/protocol.md."""
    sampling: Literal["sqrt_g", "curv_ratio", "curv_step"] = "sqrt_g"
    """π_b ∝ √Ĝ_b (`sqrt_g`); π_b ∝ √(tr H_b / G_b) (`curv_ratio`, the review's unbiased rule); or `curv_step`:
    while lr·Σ tr Ĥ_b > curvature_budget, ℓ₀ on every step, the step capped at lr·uᵀHu = curvature_budget and
    π_b ∝ Ĝ_b/tr Ĥ_b (a block preconditioner, weight_power 0), else dense MeZO. Both need curvature_every > 0."""
    curvature_every: int = 0
    """K: every K steps a third forward ℓ₀ at θ estimates uᵀHu, regressed on the masks for tr H_b; 0 = off."""
    curvature_budget: float = 1.0
    """κ (sampling=curv_step): the largest lr·uᵀHu a step may take along its probe. A step along u diverges
    past 2 (MeZO's instability); κ = 1 is half of that."""
    weight_power: float = 1.0
    """α: the update weight is π_b^(−α) (1 = Horvitz–Thompson, unbiased; 0 = no reweighting), times
    budget^(α−1) so that the lr keeps its meaning across α."""
    max_weight: float = 5.0
    """Clip on the update weight π^(−α) (a benign bias that lifts the stable lr); 0 = no clip (unbiased)."""
    forget: float = 0.999
    """Forgetting factor of the regressions' accumulated normal equations (window ~1/(1 − forget) steps)."""
    preset: str = ""
    """"" (these settings), or `released`: the released CurvZO code's rules (tensor units, budget counted in
    tensors, π ∝ score by Poisson-PPS, block-total energy score, its budget rule) for faithfulness runs."""


@dataclass(kw_only=True, slots=True)
class AdaLeZOConfig:
    """AdaLeZO (zofsdp/optim/adalezo.py; choices explained in docs/optimizers.md)."""

    rho: float = 0.25
    """Fraction of layers drawn per step: k = ceil(rho * N)."""
    gamma: float = 0.1
    """Uniform mixing weight of the sampling distribution."""
    tau: float = 1.0
    """Softmax temperature on the rewards normalised by their maximum."""
    alpha: float = 0.9
    """EMA discount of the rewards (weight of the old reward)."""
    max_weight: float = 10.0
    """Clip of the inverse-probability weight c/(k p); 0 disables the clip (unbiased)."""
    preset: Literal["", "public"] = ""
    """`public`: the public AdaLeZOTrainer's rules (k = max(1, ⌊ρN⌋), reward |Δ| in an EMA from 0, update weight
    min(1/(k p), clip)·c) and its argument defaults for every field above left at our default:
    ρ 0.1, γ 0.01, τ 0.1, α 0.9, clip 10 (its run script: ρ 0.2, τ 0.2, clip 32)."""

    def __post_init__(self) -> None:
        if self.preset == "public":  # fill only what was left at our default, so the script's values can be set
            for name, value in PUBLIC_ADALEZO.items():
                if getattr(self, name) == AdaLeZOConfig.__dataclass_fields__[name].default:
                    setattr(self, name, value)


PUBLIC_ADALEZO = {"rho": 0.1, "gamma": 0.01, "tau": 0.1, "alpha": 0.9, "max_weight": 10.0}
"""The public AdaLeZOTrainer's argument defaults (adalezo_k_ratio, _gamma, _tau, 1 − _ema_alpha, _ipw_clip)."""


@dataclass(kw_only=True, slots=True)
class BSZOConfig:
    """BSZO and BSZO-B (zofsdp/optim/bszo.py; defaults from the authors' scripts, AeonianQuill/BSZO).
    The paper runs ε = 1e-4 and lr 5e-8 to 1e-6 (OPT-13B) with these: set zo.eps and zo.lr."""

    subspace_dim: int = 2
    """k: directions per step (the paper's and every script's 2; run.py's dataclass says 1)."""
    num_samples: int = 3
    """m: Kalman observations per step, k axes then m − k adaptive ones (scripts: 3 = k + 1)."""
    prior_std: float = 0.0
    """σ_p of the subspace gradient's prior; 0 = auto, √(n/10⁶) with n the trainable parameters (code)."""
    noise_std_init: float = 0.0
    """σ_e,init of the observation noise; 0 = auto, √(n/10⁶) (code)."""
    adaptive_noise: bool = True
    """Track σ_e from the residuals (the paper credits it for bf16 robustness); false keeps σ_e,init."""
    noise_ema: float = 0.1
    """α: weight of the new squared residual in σ_e²'s EMA (code: 0.1)."""
    noise_floor: float = 0.1
    """σ_e never drops below this fraction of σ_e,init (code: 0.1; not in the paper)."""


@dataclass(kw_only=True, slots=True)
class ZOAdamConfig:
    """ZO-Adam / MeZO-Adam (zofsdp/optim/zo_adam.py): torch.optim.Adam's update on the two-sided estimate.
    The papers' grids put its lr ~100x below MeZO's (1e-5 to 1e-8)."""

    beta1: float = 0.9
    """EMA weight of the first moment (torch default, used by every public script)."""
    beta2: float = 0.999
    """EMA weight of the second moment (torch default)."""
    adam_eps: float = 1e-8
    """Added to √v̂ (torch default; loren's --eps 1e-8)."""


@dataclass(kw_only=True, slots=True)
class HiZOOConfig:
    """HiZOO (zofsdp/optim/hizoo.py). The README's OPT-13B example runs lr 1e-6, ε 1e-3 with these."""

    smooth: float = 1e-8
    """α: EMA weight of the new diagonal estimate (README `constant1e-8`, the runs the BSZO paper made;
    HiZOO.sh's default `constant0` freezes H = 1, i.e. MeZO with a third forward)."""
    estimator: Literal["paper", "code"] = "paper"
    """`paper`: |ΔL/(2ε²)·H(z² − 1)|, unbiased before the |·|; `code`: |ΔL|/(2ε²)·H·z², the public code's,
    which drops the −1 and converges to ≈ (d+2)/2 times diag(∇²L)."""


@dataclass(kw_only=True, slots=True)
class LorenConfig:
    """LOREN (zofsdp/optim/loren.py); defaults from the authors' README command and class."""

    num_queries: int = 10
    """K: forwards per step, each with its own direction (RLOO needs K >= 2). main.py's default is 10; a
    second-hand note of the paper says 6."""
    damping: float = 0.1
    """λ of the curvature I + a·aᵀ/λ (README `--damping 0.1`; main.py says 1.0)."""
    lr_cov: float = 1e-3
    """η_a: step size of the score-function update of a (README `--lr_cov 1e-3`)."""
    momentum: float = 0.9
    """β1 of the heavy-ball momentum on ≥2-D tensors, applied K times per step as the code (no (1 − β1))."""


@dataclass(kw_only=True, slots=True)
class DiZOConfig:
    """DiZO (zofsdp/optim/dizo.py): MeZO plus a periodic projection toward the pre-trained weights. Defaults
    from the authors' dizo.sh and trainer.py (Skilteee/DiZO); the README's grid in the docstrings."""

    interval: int = 50
    """Project after every `interval`-th step (code: hard-coded 50; README grid 50/100/200/400)."""
    search_iters: int = 10
    """ZO iterations of the γ search per projection, 2 forwards each (code: max_iters = 10; a third-party
    reading of the paper says 5)."""
    probe_eps: float = 0.1
    """ε_p: the perturbation of γ (dizo.sh `zo_eps_projection` 0.1; grid 0.1/0.05)."""
    proj_lr: float = 2.0
    """η_p: step size of γ, scaled by t (dizo.sh `step_size_projection` 2.0; grid 2.0/1.0)."""
    radius: float = 0.2
    """τ: γ stays in [(1 − τ)t, (1 + τ)t] and z in ±(τ/ε_p)t (dizo.sh `clip_range` 0.2; grid 0.1/0.2/0.3);
    below 0.5 so that no probe reaches the anchor."""
    targets: list[str] = field(default_factory=lambda: ["self_attn.k_proj.weight", "self_attn.v_proj.weight"])
    """Projected tensors: those whose name contains one of these (the code's OPT full fine-tuning: K and V;
    a third-party reading says Q and V). Only these have an anchor."""
    new_batches: bool = True
    """Each search iteration scores a training batch of its own (the code's), drawn from (seed, step, k);
    false re-uses the step's batch."""


@dataclass(kw_only=True, slots=True)
class ZOConfig:
    optimizer: str = "mezo"
    """One of `zofsdp.optim.OPTIMIZERS`."""
    lr: float = 1e-5
    eps: float = 1e-3
    weight_decay: float = 0.0
    """Decoupled decay on weight matrices (never on biases, norms or embeddings' norms)."""
    noise: Literal["auto", "gaussian", "table", "philox"] = "auto"
    """How z is drawn (see zofsdp.noise): fresh Gaussians per chunk, slices of a seeded Gaussian table, or
    counter-based Philox (z a pure function of key and index; one fused Triton launch per shard on CUDA).
    `auto`: philox on CUDA, gaussian elsewhere (faster on CPU; docs/performance.md)."""
    chunk_numel: int = 1 << 16
    """Noise is generated in chunks of this many elements; part of the noise's definition."""
    table_numel: int = 1 << 24
    """Size of the noise table (noise=table): 64 MiB of fp32 per rank at the default."""
    noise_threads: int = 0
    """CPU threads that generate noise in a pass (0: one per intra-op thread on CPU, one on GPU).
    Does not change the noise; each thread holds its own 640 KiB of chunk buffers."""
    curvzo: CurvZOConfig = field(default_factory=CurvZOConfig)
    adalezo: AdaLeZOConfig = field(default_factory=AdaLeZOConfig)
    bszo: BSZOConfig = field(default_factory=BSZOConfig)
    """Also read by bszo_b."""
    zo_adam: ZOAdamConfig = field(default_factory=ZOAdamConfig)
    hizoo: HiZOOConfig = field(default_factory=HiZOOConfig)
    loren: LorenConfig = field(default_factory=LorenConfig)
    dizo: DiZOConfig = field(default_factory=DiZOConfig)


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    backend: Literal["none", "fsdp2", "deepspeed"] = "none"
    deepspeed_config: str = ""
    """Optional user DeepSpeed JSON whose ZeRO-3 settings are merged into the built one."""
    timeout_minutes: float = 60.0
    """Longest wait of a rank in a collective (process-group timeout). NCCL's default, 10 minutes, is shorter
    than reading or writing a 30B checkpoint on a slow file system."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check(self)


def check(cfg: RunConfig) -> None:
    """Cross-field validation; each message says what to change."""
    check_precision(cfg.model, cfg.zo.optimizer)
    if cfg.train.steps < 0:
        raise ValueError(f"train.steps must be >= 0, got {cfg.train.steps}")
    if cfg.train.batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if cfg.train.checkpoint_every < 0 or cfg.train.keep_checkpoints < 1:
        raise ValueError(f"train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1, got "
                         f"{cfg.train.checkpoint_every} and {cfg.train.keep_checkpoints}")
    if cfg.parallel.timeout_minutes <= 0:
        raise ValueError(f"parallel.timeout_minutes must be > 0, got {cfg.parallel.timeout_minutes}")
    if cfg.zo.eps <= 0:
        raise ValueError(f"zo.eps must be > 0, got {cfg.zo.eps}")
    if cfg.zo.chunk_numel < 1024:
        raise ValueError(f"zo.chunk_numel must be >= 1024, got {cfg.zo.chunk_numel}")
    c = cfg.zo.curvzo
    if not 0 < c.pi_min <= c.budget_min <= c.budget_init <= c.budget_max <= 1:
        raise ValueError(
            "zo.curvzo needs 0 < pi_min <= budget_min <= budget_init <= budget_max <= 1, got "
            f"{c.pi_min}, {c.budget_min}, {c.budget_init}, {c.budget_max}"
        )
    if not (0 <= c.ema < 1 and 0 <= c.budget_ema < 1 and 0 <= c.unkept_decay <= 1):
        raise ValueError("zo.curvzo needs 0 <= ema < 1, 0 <= budget_ema < 1 and 0 <= unkept_decay <= 1, got "
                         f"{c.ema}, {c.budget_ema}, {c.unkept_decay}")
    check_curvzo_rules(c)
    a = cfg.zo.adalezo
    if not (0 < a.rho <= 1 and 0 <= a.gamma <= 1 and a.tau > 0 and 0 <= a.alpha < 1):
        raise ValueError("zo.adalezo needs 0 < rho <= 1, 0 <= gamma <= 1, tau > 0, 0 <= alpha < 1")
    if a.max_weight < 0 or 0 < a.max_weight < 1:
        raise ValueError(f"zo.adalezo.max_weight must be 0 (no clip) or >= 1, got {a.max_weight}")
    check_new_optimizers(cfg.zo)


def check_curvzo_rules(c: CurvZOConfig) -> None:
    """CurvZO's score, curvature and weight settings (issue 14)."""
    if c.curvature_every < 0 or c.weight_power not in (0.0, 0.5, 1.0):
        raise ValueError("zo.curvzo needs curvature_every >= 0 and weight_power in {0, 0.5, 1}; got "
                         f"{c.curvature_every}, {c.weight_power}")
    if not (c.max_weight == 0 or c.max_weight >= 1) or not 0 < c.forget <= 1:
        raise ValueError(f"zo.curvzo needs max_weight 0 (no clip) or >= 1 and 0 < forget <= 1; got "
                         f"{c.max_weight}, {c.forget}")
    if c.preset not in ("", "released"):
        raise ValueError(f"zo.curvzo.preset must be '' or 'released', got {c.preset!r}")
    if (c.score == "fixed") != bool(c.probs_file):
        raise ValueError("zo.curvzo.score=fixed and zo.curvzo.probs_file go together (the file gives the keep "
                         f"probabilities); got score={c.score!r}, probs_file={c.probs_file!r}")
    if c.sampling in ("curv_ratio", "curv_step") and c.curvature_every == 0:
        raise ValueError(f"zo.curvzo.sampling={c.sampling} needs zo.curvzo.curvature_every > 0 (tr H_b comes "
                         "from the third forward ℓ₀)")
    if c.sampling == "curv_step" and (c.weight_power != 0 or c.score != "regression" or c.preset):
        raise ValueError("zo.curvzo.sampling=curv_step samples as a block preconditioner: it needs "
                         "zo.curvzo.weight_power=0, score=regression and no preset; got "
                         f"{c.weight_power}, {c.score!r}, {c.preset!r}")
    if c.snr_every < 1:
        raise ValueError(f"zo.curvzo.snr_every must be >= 1, got {c.snr_every}")
    if not c.curvature_budget > 0:
        raise ValueError(f"zo.curvzo.curvature_budget must be > 0, got {c.curvature_budget}")


def check_new_optimizers(zo: ZOConfig) -> None:
    """BSZO, ZO-Adam, HiZOO: each message names the field to fix."""
    b = zo.bszo
    if not 1 <= b.subspace_dim <= b.num_samples:
        raise ValueError(f"zo.bszo needs 1 <= subspace_dim <= num_samples, got {b.subspace_dim}, {b.num_samples}")
    if b.prior_std < 0 or b.noise_std_init < 0 or not 0 < b.noise_ema <= 1 or not 0 <= b.noise_floor <= 1:
        raise ValueError("zo.bszo needs prior_std >= 0, noise_std_init >= 0 (0 = auto), 0 < noise_ema <= 1, "
                         f"0 <= noise_floor <= 1; got {b.prior_std}, {b.noise_std_init}, {b.noise_ema}, "
                         f"{b.noise_floor}")
    a = zo.zo_adam
    if not (0 <= a.beta1 < 1 and 0 <= a.beta2 < 1 and a.adam_eps > 0):
        raise ValueError(f"zo.zo_adam needs 0 <= beta1, beta2 < 1 and adam_eps > 0, got {a.beta1}, {a.beta2}, "
                         f"{a.adam_eps}")
    if not 0 <= zo.hizoo.smooth <= 1:
        raise ValueError(f"zo.hizoo.smooth must be in [0, 1], got {zo.hizoo.smooth}")
    d = zo.dizo
    if d.interval < 1 or d.search_iters < 0 or d.probe_eps <= 0 or d.proj_lr < 0 or not 0 < d.radius < 0.5:
        raise ValueError("zo.dizo needs interval >= 1, search_iters >= 0, probe_eps > 0, proj_lr >= 0 and "
                         f"0 < radius < 0.5; got {d.interval}, {d.search_iters}, {d.probe_eps}, {d.proj_lr}, {d.radius}")
    if not d.targets:
        raise ValueError("zo.dizo.targets is empty: name at least one tensor to project (e.g. k_proj.weight)")
    lo = zo.loren
    if lo.num_queries < 2 or lo.damping <= 0 or lo.lr_cov < 0 or not 0 <= lo.momentum < 1:
        raise ValueError("zo.loren needs num_queries >= 2 (RLOO), damping > 0, lr_cov >= 0, 0 <= momentum < 1; "
                         f"got {lo.num_queries}, {lo.damping}, {lo.lr_cov}, {lo.momentum}")


def compute_dtype(model: ModelConfig) -> str:
    """The forward's dtype: model.compute_dtype, or model.dtype when that is empty."""
    return model.compute_dtype or model.dtype


IN_PLACE_ONLY = ("hizoo", "loren", "dizo")
"""Optimizers whose probe is not a plain εz (z/√H, ε(u − βp·a), DiZO's θ0 + f·(θ − θ0)) but uses state sharded like the weights:
a gathered probe cannot apply it, so they perturb fp32 shards in place."""


def perturbs_gathered(model: ModelConfig, optimizer: str = "mezo") -> bool:
    """Whether probes go to the gathered parameters (model.perturb resolved; see ModelConfig.perturb)."""
    if model.perturb != "auto":
        return model.perturb == "gathered"
    if model.dtype != "float32":
        return True
    return compute_dtype(model) != model.dtype and optimizer not in IN_PLACE_ONLY


def check_precision(model: ModelConfig, optimizer: str = "mezo") -> None:
    """The precision modes that exist: same dtype for both, or fp32 shards with low-precision compute."""
    compute = compute_dtype(model)
    if compute != model.dtype and model.dtype != "float32":
        raise ValueError(f"model.compute_dtype={compute} with model.dtype={model.dtype}: only float32 shards "
                         "can compute in another dtype (mixed precision); set compute_dtype to "
                         f"{model.dtype} or model.dtype to float32")
    if model.perturb == "shards" and model.dtype != "float32":
        raise ValueError(f"model.perturb=shards with model.dtype={model.dtype}: +εz, −2εz, +εz in place does not "
                         "restore bf16/fp16 shards; use model.perturb=auto (probes on the gathered copy)")
    if model.perturb == "gathered" and optimizer in IN_PLACE_ONLY:
        raise ValueError(f"model.perturb=gathered with zo.optimizer={optimizer}: its probe is scaled by state "
                         "sharded like the weights, so it needs model.perturb=shards (or auto) and fp32 shards")


# ---------------------------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list like [1, 2], got {value!r}")
        return [_coerce(item, typing.get_args(tp)[0], key) for item in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys raise and list the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key '{path}'; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: '{part}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` pairs; the value is read as YAML, so `1e-5`, `true` and `[1, 2]` get their types."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (or nothing: the defaults) plus dotted overrides → a validated RunConfig."""
    tree: dict = {}
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return from_dict(RunConfig, tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike, header: str = "") -> None:
    """The resolved config as YAML that `-c` reads back; `header` lines become comments at the top (the
    versions a run used, for bug reports, without adding keys the loader would refuse)."""
    with open(path, "w") as f:
        for line in header.splitlines():
            f.write(f"# {line}\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
