"""Precision modes, and where the probes go, as the backends apply them (docs/memory.md, "Precision modes").

- fp32 shards, fp32 compute: in-place probes on the shards (model.perturb=auto), the old exact-to-a-bit path.
- fp32 shards, bf16/fp16 compute (mixed): the shards stay fp32 and receive the updates; only the forward
  runs in the low dtype. FSDP2 casts each shard before its all-gather (`MixedPrecisionPolicy`), DeepSpeed
  gathers Linear weights in the low dtype (`torch_autocast`), one process runs the forward under
  `torch.autocast`. Probes go to the gathered copies (below), so the shards come back bit for bit.
- bf16/fp16 shards: probes on the gathered copies too; the shards only receive the stochastically rounded
  update.
"Gathered" probes (zofsdp.optim.probe) are added by forward pre-hooks: on FSDP2 to each unit's unsharded
parameters, on DeepSpeed to each module's gathered parameters, on one process to a copy swapped in for the
module's forward. model.perturb=shards keeps fp32 shards perturbed in place (HiZOO and LOREN need it).
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


def gathered_probes(cfg) -> bool:
    """Whether cfg (a RunConfig or ModelConfig; None = fp32 in place) sends probes to the gathered parameters."""
    if cfg is None:
        return False
    from zofsdp.config import perturbs_gathered

    zo = getattr(cfg, "zo", None)  # a bare ModelConfig: MeZO's plain εz
    return perturbs_gathered(getattr(cfg, "model", cfg), zo.optimizer if zo else "mezo")


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


def probe_deepspeed(model: nn.Module, probe: Probe) -> None:
    """Hooks on every module of a ZeRO-3 model that add the probe to its parameters once they are gathered.
    Register after deepspeed.initialize: ours then run after ZeRO-3's fetch (pre) and release (post) hooks.

    A parameter can stay gathered from one module to the next (a tied embedding reused by the lm head
    within ZeRO-3's max_reuse_distance), so each gathered tensor is perturbed once: `carried` remembers
    the ones that hold the probe until ZeRO-3 releases them. On one rank ZeRO-3 does not gather: the
    parameter's data is its partition, so the probe goes to a copy (freed by the release)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    names = canonical_names(model)
    carried: dict[int, tuple[nn.Parameter, int]] = {}  # id -> (parameter, data_ptr of the perturbed copy)

    def forget_released(*_) -> None:
        for key, (p, ptr) in list(carried.items()):
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE or p.data.data_ptr() != ptr:
                del carried[key]

    def pre(mod, args, own):
        forget_released()
        if not probe.active:
            return
        for p in own:
            name = names[id(p)]
            if id(p) in carried or name not in probe.names:
                continue
            if p.data.untyped_storage().data_ptr() == p.ds_tensor.untyped_storage().data_ptr():
                p.data = p.data.clone()  # one rank: never perturb the partition itself
            probe.apply(name, p.data)
            carried[id(p)] = (p, p.data.data_ptr())

    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            module.register_forward_pre_hook(lambda mod, args, own=own: pre(mod, args, own))
        module.register_forward_hook(lambda mod, args, output: forget_released())
