"""Precision modes, as the backends apply them (docs/memory.md, "Precision modes").

- fp32 shards, fp32 compute: today's exact in-place probes.
- fp32 shards, bf16/fp16 compute (mixed): the shards stay fp32 and are perturbed in place exactly as in
  fp32; only the forward runs in the low dtype. FSDP2 casts each shard before its all-gather
  (`MixedPrecisionPolicy`), DeepSpeed gathers Linear weights in the low dtype (`torch_autocast`), one
  process runs the forward under `torch.autocast`.
- bf16/fp16 shards: probes are applied to the gathered parameters by forward pre-hooks
  (zofsdp.optim.probe); the shards only receive the stochastically rounded update.
"""

from __future__ import annotations

import torch
from torch import nn

from zofsdp.optim.probe import Probe


def dtypes(cfg) -> tuple[torch.dtype, torch.dtype]:
    """(shard dtype, compute dtype) of a RunConfig or ModelConfig; fp32 both when cfg is None."""
    if cfg is None:
        return torch.float32, torch.float32
    model = getattr(cfg, "model", cfg)
    store = getattr(torch, model.dtype)
    return store, getattr(torch, model.compute_dtype or model.dtype)


def autocast_forward(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Run model's forward under torch.autocast(dtype): the one-process (and DeepSpeed) mixed mode."""
    forward = model.forward

    def cast_forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = cast_forward


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in named_parameters() (a tied weight gets its first name, as the shards)."""
    return {id(p): name for name, p in model.named_parameters()}


def probe_fsdp2_units(model: nn.Module, layers: list[nn.Module], probe: Probe) -> None:
    """Pre-forward hooks on each FSDP2 unit (every decoder layer, then the root) that add the probe to
    the unit's own unsharded parameters. Register after fully_shard: FSDP2 prepends its own pre-forward
    hook, so ours runs after the all-gather. Each unit's parameters are gathered once per forward (the
    root's stay gathered for the whole forward), so each tensor is perturbed exactly once."""
    prefix = {id(m): n for n, m in model.named_modules()}
    layer_names = [prefix[id(m)] for m in layers]

    def hook_for(module: nn.Module, names: list[tuple[str, str]]):
        def hook(mod, args, kwargs):
            for full, local in names:  # fetched at call time: FSDP2 swaps the parameter objects
                probe.apply(full, mod.get_parameter(local).data)
        return hook

    for layer, name in zip(layers, layer_names):
        own = [(f"{name}.{local}", local) for local, _ in layer.named_parameters()]
        layer.register_forward_pre_hook(hook_for(layer, own), with_kwargs=True)
    in_layers = tuple(f"{n}." for n in layer_names)
    root = [(n, n) for n, _ in model.named_parameters() if not n.startswith(in_layers)]
    model.register_forward_pre_hook(hook_for(model, root), with_kwargs=True)


def probe_by_swapping(model: nn.Module, probe: Probe) -> None:
    """One process: the parameters are the shards, so each leaf module's parameters are swapped for a
    perturbed copy during its forward and put back after it (one tensor's copy alive at a time; a tied
    weight is copied, identically, by each module that uses it)."""
    names = canonical_names(model)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []

        def pre(mod, args, own=own, saved=saved):
            if not probe.active:
                return
            for p in own:
                if names[id(p)] not in probe.names:
                    continue
                copy = p.data.clone()
                probe.apply(names[id(p)], copy)
                saved.append((p, p.data))
                p.data = copy

        def post(mod, args, output, saved=saved):
            while saved:
                p, original = saved.pop()
                p.data = original

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
