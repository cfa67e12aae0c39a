"""Lean loading: build the model on the meta device, shard it, then fill each rank's shard from the checkpoint.

No rank ever holds the whole model. Each rank reads only its own rows of each tensor from the safetensors
files (`safe_open(...).get_slice(name)[lo:hi]`, memory-mapped), so its host memory peaks at its shard (on CPU;
on GPU the shard lives on the device) plus one tensor's rows in the checkpoint's dtype. Chosen over
`set_model_state_dict(..., broadcast_from_rank0=True)` because, measured on 3 gloo ranks (docs/memory.md),
the broadcast needs the full model on rank 0 whenever the dtype changes, sends every tensor through rank 0,
and peaks higher on the other ranks; per-rank reads need no collective at all. The broadcast remains the
fallback for checkpoints that are not safetensors (`.bin`, GGUF is converted to safetensors first).

Traps handled here (see ../shared/GPU-PATH.md §1.4):
- `accelerate.init_empty_weights(include_buffers=False)` keeps non-persistent buffers (rotary `inv_freq`)
  real, but unties `lm_head` from the embeddings in transformers 5.x: `tie_weights()` again before sharding.
- `to_empty` would wipe those buffers: only tensors still on meta are materialised.
- FSDP2 re-pads a replaced local tensor (`reset_sharded_param`); `FSDPModule._apply` does it at once, so the
  shard views taken later (`Backend.shards`) are the storage the forwards gather from (a test checks it).
- Every parameter must be found in the checkpoint (tied aliases count once): an unfilled shard would be
  `torch.empty` garbage, so a missing key is an error.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import torch
from torch import nn

from zofsdp.config import ModelConfig

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------- sources


def architecture_config(path: str | Path, min_vocab: int = 0):
    """A Hugging Face config from an architecture JSON (configs/models/*.json; `_comment` is dropped).

    The vocabulary grows to `min_vocab` when smaller, so the borrowed tokenizer's ids stay in range.
    """
    from transformers import AutoConfig

    data = json.loads(Path(path).read_text())
    data.pop("_comment", None)
    if "model_type" not in data:
        raise ValueError(f"{path}: an architecture JSON needs a model_type (e.g. 'opt', 'llama')")
    if data.get("vocab_size", 0) < min_vocab:
        log.warning("%s: vocab_size %s raised to the tokenizer's %d", path, data.get("vocab_size"), min_vocab)
        data["vocab_size"] = min_vocab
    return AutoConfig.for_model(**data)


def is_architecture(name: str) -> bool:
    """`model.name_or_path` names an architecture JSON: a model with random weights (no checkpoint)."""
    return name.endswith(".json") and Path(name).expanduser().is_file()


def checkpoint_folder(cfg: ModelConfig, vocab_size: int) -> Path:
    """A local folder holding config.json and the weights, for every kind of `model.name_or_path`."""
    from zofsdp.models import TINY, resolve

    if cfg.name_or_path in TINY:
        from zofsdp.parallel.deepspeed import tiny_checkpoint

        return tiny_checkpoint(cfg, vocab_size)  # the same random model as models.load_model builds
    source = resolve(cfg)
    if isinstance(source, Path):
        return source
    from huggingface_hub import snapshot_download  # a hub id: only configs and safetensors are fetched

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))


class SafetensorsCheckpoint:
    """The tensors of a folder's safetensors file(s), read by rows without loading whole files."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            self.files = {key: folder / name for key, name in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                self.files = {key: folder / "model.safetensors" for key in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise FileNotFoundError(f"{folder} holds no safetensors weights")
        self._open: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of dim 0 (the whole tensor for a 0-dim one), as a CPU tensor in the file's dtype."""
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        tensor = self._open[path].get_slice(key)
        return tensor[lo:hi] if len(tensor.get_shape()) else tensor[:]

    def close(self) -> None:
        self._open.clear()  # safe_open handles unmap when dropped


def checkpoint_key(model: nn.Module, names: list[str], ckpt: SafetensorsCheckpoint) -> str | None:
    """The checkpoint's key for a parameter known by `names` (tied aliases), allowing for checkpoints saved
    from the base model (keys without `model.`) or with the prefix where the model has none."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name in names:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
        for key in candidates:
            if key in ckpt:
                return key
    return None


# ------------------------------------------------------------------------------------------- building


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on meta (no memory) and real non-persistent buffers, ties intact."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_empty_weights unties lm_head from the embeddings (transformers 5.x)
    model.config.use_cache = False  # a KV cache is wasted memory in training
    model.requires_grad_(False)  # forward passes only
    return model.eval()


def materialise(model: nn.Module, device: torch.device) -> None:
    """Allocate what is still on meta (the shards), uninitialised; real buffers only move to `device`."""
    from torch.distributed.fsdp import FSDPModule

    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t.to(device))
    if not isinstance(model, FSDPModule):
        # A plain meta tensor cannot take the new storage in place, so `_apply` gives each module a new
        # Parameter and ties break (FSDP2's DTensor parameters are updated in place and stay tied).
        model.tie_weights()


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(editable local tensor, first global row, end row) of a parameter: FSDP2's Shard(0) or a plain one."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p.data, 0, p.shape[0] if p.dim() else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p.to_local()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    lo = offset[0] if local.numel() else 0
    return local, lo, lo + (shape[0] if local.numel() else 0)


def tied_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (a tied lm_head shares the embedding's)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


@torch.no_grad()
def fill_from_checkpoint(model: nn.Module, ckpt: SafetensorsCheckpoint) -> None:
    """Copy each parameter's local rows (and persistent buffers) from the checkpoint, casting on the way."""
    aliases, missing = tied_names(model), []
    for name, p in model.named_parameters():
        key = checkpoint_key(model, aliases[id(p)], ckpt)
        if key is None:
            missing.append(name)
            continue
        local, lo, hi = local_rows(p)
        if local.numel():
            local.copy_(ckpt.rows(key, lo, hi).view(local.shape))
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        key = checkpoint_key(model, [name], ckpt) if name in persistent else None
        if key is not None:
            b.copy_(ckpt.rows(key, 0, b.shape[0] if b.dim() else 1))
    if missing:
        from zofsdp.errors import UserError

        raise UserError(f"the checkpoint lacks {len(missing)} parameters (e.g. {missing[:3]}); their shards "
                        "would stay uninitialised")


@torch.no_grad()
def random_fill(model: nn.Module, seed: int = 0) -> None:
    """Random weights for an architecture JSON: N(0, initializer range) for matrices, 1 for norm weights,
    0 for biases. Drawn per local shard from (seed, name): reproducible for a given layout, but not the
    same model on another world size (use a checkpoint where trajectories are compared)."""
    config = model.config
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02
    for name, p in model.named_parameters():
        local, lo, _ = local_rows(p)
        if name.endswith("bias"):
            local.zero_()
        elif p.dim() == 1:
            local.fill_(1.0)
        elif local.numel():
            gen = torch.Generator(device=local.device).manual_seed(seed * 1000003 + zlib.crc32(name.encode()) + lo)
            local.normal_(0.0, std, generator=gen)


def load_lean(cfg: ModelConfig, vocab_size: int, shard, device: torch.device) -> nn.Module:
    """Meta build -> `shard(model)` (fully_shard, or identity) -> materialise -> fill from the checkpoint.

    With an architecture JSON (`model.name_or_path=configs/models/opt-30b.json`) the weights are random.
    """
    from transformers import AutoConfig

    dtype = getattr(torch, cfg.dtype)
    if is_architecture(cfg.name_or_path):
        model = shard(empty_model(architecture_config(cfg.name_or_path, vocab_size), dtype))
        materialise(model, device)
        random_fill(model)
        return model
    folder = checkpoint_folder(cfg, vocab_size)
    model = shard(empty_model(AutoConfig.from_pretrained(folder), dtype))
    materialise(model, device)
    try:
        ckpt = SafetensorsCheckpoint(folder)
    except FileNotFoundError:
        log.warning("%s has no safetensors files: rank 0 loads the whole model and broadcasts it tensor by "
                    "tensor (convert the checkpoint to safetensors for per-rank reads)", folder)
        fill_from_rank0(model, cfg, vocab_size)
        return model
    try:
        fill_from_checkpoint(model, ckpt)
    finally:
        ckpt.close()
    return model


def fill_from_rank0(model: nn.Module, cfg: ModelConfig, vocab_size: int) -> None:
    """Fallback: rank 0 loads the full model (transformers does renames and dtype), then every tensor is
    broadcast in turn and each rank keeps its rows (torch's set_model_state_dict, one tensor at a time)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from zofsdp.models import load_model

    full = load_model(cfg, vocab_size).state_dict() if dist.get_rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)


def shard_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters: FSDP2 local shards, ZeRO-3 partitions or whole tensors; tied once."""
    total = 0
    for p in model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else local_rows(p)[0]
        total += local.numel() * local.element_size()
    return total


def largest_tensor_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the largest parameter (whole), in `dtype` or its own."""
    size = torch.empty(0, dtype=dtype).element_size() if dtype else None
    return max(getattr(p, "ds_numel", p.numel()) * (size or p.element_size()) for p in model.parameters())


def load_estimate(model_json: str | Path, world_size: int, dtype: torch.dtype) -> dict:
    """ESTIMATE of host bytes per rank while loading a model of this architecture (simulator's companion).

    lean_gpu: the largest slice a rank reads (its rows of the largest tensor, in the checkpoint's dtype,
    `torch_dtype` in the JSON); the shard itself goes to the GPU. lean_cpu: that plus the shard, for CPU
    runs. plain: the whole model in `dtype` per rank, as from_pretrained on every rank holds it (anonymous
    memory when the dtype changes, shared page cache when it does not). Python, CUDA context and library
    memory (~1-3 GiB per process) come on top of each.
    """
    config = architecture_config(model_json)
    ckpt_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or dtype
    ckpt_dtype = getattr(torch, ckpt_dtype) if isinstance(ckpt_dtype, str) else ckpt_dtype
    with torch.device("meta"):
        model = empty_model(config, dtype)
    ckpt_size, size = torch.empty(0, dtype=ckpt_dtype).element_size(), torch.empty(0, dtype=dtype).element_size()
    slices, shard, total = [], 0, 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        row_numel = p.numel() // max(rows, 1)
        local_rows = -(-rows // world_size)
        slices.append(local_rows * row_numel * ckpt_size)
        shard += local_rows * row_numel * size
        total += p.numel() * size
    largest_slice = max(slices)
    return {"estimate": True, "checkpoint_dtype": str(ckpt_dtype).removeprefix("torch."),
            "lean_gpu": largest_slice, "lean_cpu": shard + largest_slice, "plain": total}
