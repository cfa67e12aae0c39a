"""DeepSpeed ZeRO-3: every parameter split flat over all ranks; each rank perturbs its own partition.

ZeRO-3 keeps, per parameter p, a 1-D partition `p.ds_tensor` of length ceil(numel / world_size); rank r
owns global flat indices [r * len, (r + 1) * len), and the tail of the last partition is padding. A
forward all-gathers each layer's parameters from those partitions and frees them after use, so an
in-place edit of `ds_tensor` between forwards is exactly an edit of the model — as long as nothing stays
gathered. Two ZeRO-3 features keep parameters gathered and are therefore switched off or refused:
- persistence (`stage3_param_persistence_threshold`, default 1e5 elements: norms and biases stay gathered
  after the first forward, and edits to their `ds_tensor` would be silently ignored) — forced to 0;
- hpZ secondary partitions and quantized weights (the forward gathers from a copy, or a lossy one).
A forward hook checks after every forward that every parameter is released again.

DeepSpeed is started without an optimizer: ZO training has no gradients and updates the partitions itself.
The model is loaded with `HfDeepSpeedConfig` + `from_pretrained`, so it is partitioned while it loads
(only rank 0 reads checkpoint values) and no rank ever holds all of it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from zofsdp.config import ModelConfig, RunConfig
from zofsdp.optim.probe import Probe
from zofsdp.parallel.base import Backend, init_distributed
from zofsdp.parallel.precision import autocast_forward, dtypes, gathered_probes, probe_deepspeed

log = logging.getLogger(__name__)

# Top-level keys DeepSpeed uses to size batches; ZO splits the global batch itself (train.batch_size), so
# these are set to one row per rank and a user's values are ignored.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _set_environment() -> None:
    """Before deepspeed is imported: pick the accelerator, and where its JIT-compiled ops are cached."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # On CPU, deepspeed's first init_distributed compiles a small shared-memory op (~46 s). Cache it
    # inside the Python environment (e.g. .venv/torch_extensions) so that it is built once per
    # environment, and CI can cache that folder with the environment.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed config for `cfg`: ZeRO-3, no optimizer, persistence off, dtype from model.dtype,
    merged with the user's JSON (`parallel.deepspeed_config`) after checking it can work."""
    dtype = cfg.model.dtype
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            # 0: no parameter stays gathered between forwards, so edits of ds_tensor always take effect.
            "stage3_param_persistence_threshold": 0,
        },
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 1 << 30,  # the engine never steps; keep its step logging quiet
    }
    compute = cfg.model.compute_dtype or dtype
    if compute != dtype:
        # Mixed: fp32 partitions; DeepSpeed gathers Linear weights (a tied embedding too) in `compute`,
        # the rest in fp32, and we enter the autocast (forwards call the module, not the engine).
        ds["torch_autocast"] = {"enabled": True, "dtype": compute}
    path = cfg.parallel.deepspeed_config
    if path:
        user = read_user_config(path)
        check_user_config(user, dtype, source=path)
        for key, value in user.items():
            if key == "zero_optimization":
                ds["zero_optimization"].update(value)
            elif key in BATCH_KEYS:
                log.warning("%s: ignoring %s (ZO splits train.batch_size over ranks itself)", path, key)
            else:
                ds[key] = value
    return ds


def read_user_config(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"parallel.deepspeed_config: file not found: {path}")
    with open(path) as f:
        try:
            user = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"parallel.deepspeed_config: {path} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise ValueError(f"parallel.deepspeed_config: {path} must hold a JSON object")
    return user


def check_user_config(user: dict, dtype: str, source: str = "DeepSpeed config") -> None:
    """Refuse, with the reason, settings that cannot work with forward-only training on ZeRO-3."""
    where = f"parallel.deepspeed_config ({source})"
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ValueError(
                f"{where}: remove the '{key}' section. Zeroth-order training computes no gradients and "
                f"updates the parameter partitions itself (set zo.optimizer and zo.lr instead); a DeepSpeed "
                f"{key} would never run.")
    for key, wanted in (("bf16", "bfloat16"), ("fp16", "float16")):
        enabled = bool((user.get(key) or {}).get("enabled", False))
        if enabled != (dtype == wanted):
            raise ValueError(
                f"{where}: '{key}.enabled' is {str(enabled).lower()} but model.dtype is {dtype}. The dtype "
                f"comes from model.dtype: drop the '{key}' section or set model.dtype to match.")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{where}: 'zero_optimization' must be an object")
    stage = zero.get("stage", 3)
    if stage != 3:
        raise ValueError(
            f"{where}: zero_optimization.stage is {stage}, but only stage 3 works here. Stages 0-2 shard "
            "only optimizer state and gradients (which forward-only training does not have) and keep a "
            "full copy of the parameters on every rank; set \"stage\": 3.")
    threshold = zero.get("stage3_param_persistence_threshold", 0)
    if threshold != 0:
        raise ValueError(
            f"{where}: zero_optimization.stage3_param_persistence_threshold is {threshold}; it must be 0. "
            "Parameters below it (norms, biases) stay gathered after the first forward, so the "
            "perturbations written to their partitions would be silently ignored.")
    for key in ("offload_param", "offload_optimizer"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", None):
            reason = ("there is no optimizer state to offload" if key == "offload_optimizer" else
                      "offloaded partitions live on another device than the noise and are not supported yet")
            raise ValueError(f"{where}: zero_optimization.{key}.device is {device!r}: {reason}. "
                             f"Remove '{key}' or set its device to \"none\".")
    if zero.get("zero_hpz_partition_size", 1) != 1:
        raise ValueError(f"{where}: zero_hpz_partition_size must be 1. hpZ gathers from a secondary copy "
                         "of the partitions that only an optimizer step refreshes: perturbations would be "
                         "ignored.")
    if zero.get("zero_quantized_weights", False):
        raise ValueError(f"{where}: zero_quantized_weights must be false: a quantized all-gather rounds the "
                         "perturbation away (the two ZO forwards would not see θ ± εz).")
    if (user.get("torch_autocast") or {}).get("enabled", False):
        raise ValueError(f"{where}: remove 'torch_autocast': the compute dtype comes from model.dtype.")
    if zero.get("mics_shard_size", -1) > 0:
        raise ValueError(f"{where}: MiCS (mics_shard_size) is not supported: it changes the partition "
                         "layout.")


def tiny_checkpoint(cfg: ModelConfig, vocab_size: int) -> Path:
    """Save a tiny test model once to the cache, so that from_pretrained can partition it while loading.

    (`deepspeed.zero.Init` around a model built from a config fails in transformers 5's `_init_weights`.)
    The weights are those `zofsdp.models.load_model` builds, so every backend starts from the same model;
    the folder name carries the versions that could change them.
    """
    import transformers

    from zofsdp.models import cache_root, load_model, publish, write_hf_folder

    versions = f"tf{transformers.__version__}-torch{torch.__version__}"
    tag = f"{cfg.name_or_path}-v{vocab_size}-{cfg.dtype}-{versions}"
    target = cache_root(cfg) / "tiny" / tag.replace("+", "_")

    def build(tmp: Path) -> None:
        model = load_model(cfg, vocab_size, device="cpu")
        write_hf_folder(tmp, model, model.state_dict())

    publish(target, build, tokenizer=False)
    return target


def _trimmed(model: nn.Module) -> nn.Module:
    """Give glibc's freed heap pages back to the system after a CPU load. zero.Init's transients on CPU
    (measured live peak: partition + ~2.5 × the largest tensor) are freed, but glibc keeps up to ~160 MiB
    more of them resident (docs/memory.md); on GPU they are device memory and this changes nothing."""
    if next(model.parameters()).device.type == "cpu":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            pass
    return model


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    probe: Probe | None = None
    """Set when probes go to the gathered parameters (bf16/fp16 partitions, mixed; model.perturb)."""

    def __init__(self, cfg: RunConfig) -> None:
        _set_environment()
        import deepspeed

        self.ds_config = deepspeed_config(cfg)  # a config that cannot work fails here, before any collective
        self.store_dtype, self.compute_dtype = dtypes(cfg)
        self.gathered = gathered_probes(cfg) or self.store_dtype != torch.float32
        self.rank, self.world_size, self.device = init_distributed(cfg.parallel.timeout_minutes)
        # Wraps the process group made above (deepspeed's comm layer must know it before initialize).
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   verbose=False)

    def load_model(self, cfg: ModelConfig, vocab_size: int) -> nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        from zofsdp.loading import architecture_config, is_architecture
        from zofsdp.models import TINY, resolve

        dtype = getattr(torch, cfg.dtype)
        # Built before HfDeepSpeedConfig exists (see below).
        random_weights = is_architecture(cfg.name_or_path)
        if random_weights:  # an architecture JSON: random weights, initialised inside zero.Init
            source = architecture_config(cfg.name_or_path, vocab_size)
        else:
            source = tiny_checkpoint(cfg, vocab_size) if cfg.name_or_path in TINY else resolve(cfg)
        # While this object is alive, transformers (which finds it through a weak reference) builds every
        # model inside deepspeed.zero.Init: from_pretrained then partitions the model as it loads (only
        # rank 0 reads the checkpoint). Drop it right after, so that later plain models are not partitioned.
        hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        try:
            build = AutoModelForCausalLM.from_config if random_weights else AutoModelForCausalLM.from_pretrained
            model = self._measure_load(lambda: _trimmed(build(source, dtype=dtype)))
        finally:
            del hf_ds_config
            unset_hf_deepspeed_config()
        model.config.use_cache = False  # a KV cache is wasted memory in training
        model.requires_grad_(False)  # forward passes only
        return model.eval()

    def wrap(self, model: nn.Module) -> nn.Module:
        import deepspeed

        if not hasattr(next(model.parameters()), "ds_tensor"):
            raise ValueError("parallel.backend=deepspeed needs a model loaded by DeepSpeedBackend.load_model "
                             "(partitioned while loading); got an unpartitioned model")
        self._remember(model)
        engine, *_ = deepspeed.initialize(model=model, config=self.ds_config)
        engine.module.register_forward_hook(self._check_released)
        self.engine = engine  # keeps DeepSpeed's state (hooks, parameter coordinator) alive
        autocast = self.ds_config.get("torch_autocast", {})
        if autocast.get("enabled"):  # the engine's forward would enter it; we call the module directly
            autocast_forward(engine.module, getattr(torch, autocast["dtype"]), self.device)
        if self.gathered:  # after initialize: our hooks run after ZeRO-3's gather and release hooks
            self.probe = Probe()
            probe_deepspeed(engine.module, self.probe)
        # Forwards call the module itself: ZeRO-3's gather/release hooks live on its submodules, and the
        # engine's own forward adds only autocast (refused above) and backward hooks (no backward here).
        # The module also keeps `.config` the Hugging Face config (the engine's is DeepSpeed's).
        return engine.module

    def _check_released(self, module, args, output) -> None:
        """After a forward every parameter must be back to its partition, or later edits are lost."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        held = [n for n, p in module.named_parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
        if held:
            raise RuntimeError(f"ZeRO-3 kept {len(held)} parameters gathered after a forward "
                               f"(e.g. {held[0]}): edits to their partitions would be ignored. Check "
                               "the DeepSpeed config "
                               "(persistence threshold, hpZ).")

    @torch.no_grad()
    def local_params(self):
        out = []
        for name, p in self.engine.module.named_parameters():
            partition = p.ds_tensor.data.view(-1)
            start = self.rank * partition.numel()
            # The last partitions are padded up to ceil(numel / world_size); never touch the padding.
            owned = max(0, min(partition.numel(), p.ds_numel - start))
            out.append((name, partition[:owned], start if owned else 0, p.ds_numel))
        return out

    def full_tensors(self, owners: list[tuple[str, int]]):
        """Each parameter whole on its owner, from the ranks' partitions sent point-to-point (no
        GatheredParameters: an all-gather would put a copy on every rank, two with gloo on CPU)."""
        from zofsdp.saving import gather_partitions

        state = self.engine.module.state_dict(keep_vars=True)
        for key, owner in owners:
            t = state[key]
            if not hasattr(t, "ds_tensor"):  # a buffer: whole on every rank
                yield key, t if self.rank == owner else None
                continue
            full = gather_partitions(t.ds_tensor.data.view(-1), owner, self.rank, self.world_size)
            yield key, None if full is None else full[: t.ds_numel].view(t.ds_shape)
