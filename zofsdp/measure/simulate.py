"""Simulated per-rank memory of models no machine here can hold (30B-class), on one CPU in seconds.

The model is built on the `meta` device from its config JSON, wrapped by the same backend code as a real
run (`none` for one rank, FSDP2 otherwise) under a `fake` process group, and materialised with `to_empty`
inside `FakeTensorMode`: tensors have shapes, dtypes and storages sizes but no data. The same measurement
code as a real run (`zofsdp.measure.tracker`) then runs an inference forward and each ZO optimizer's real step
on rank 0's slice of the batch, under the PyTorch memory trackers.

One shortcut, for time only: in the update phases the noise is applied to one chunk per distinct kind of
shard (size, dtype, alignment) and direction, not to every chunk (a fake op costs ~1 ms; OPT-30B has
~57,000 chunks per rank and pass). Every chunk runs the same code on the same buffer, so the phase's peak
is the same; the optimizers' own code runs unchanged. Real runs, which visit every chunk, are what
`tests/memory` uses to catch parameter-sized temporaries.

What the simulation leaves out (add it when sizing a GPU): the CUDA context and kernels (~0.5-1 GiB per
process), the caching allocator's fragmentation and reserved-but-free blocks (often 5-15 %), NCCL's
communication buffers and streams, and any memory of other processes on the device. It counts tensors.

AdamW full fine-tuning and DeepSpeed ZeRO-3 are *analytic* (formulas below, labelled so in the output):
faithful simulation of ZeRO-3's partitioning under a fake process group is not available.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from zofsdp.measure.tracker import (
    fake_losses,
    make_tracker,
    measure_inference,
    measure_optimizer,
    synthetic_batch,
)
from zofsdp.noise import Noise, Piece, Shard

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}

LEFT_OUT = ("CUDA context and kernels (~0.5-1 GiB per process), allocator fragmentation and cached free "
            "blocks, NCCL communication buffers, other processes on the device")


def load_model_config(path: str | Path):
    """A Hugging Face config from a config JSON (a `_comment` key is allowed and dropped)."""
    from transformers import AutoConfig

    data = json.loads(Path(path).read_text())
    data.pop("_comment", None)
    if "model_type" not in data:
        raise ValueError(f"{path}: a model config needs a model_type (e.g. 'opt', 'llama')")
    return AutoConfig.for_model(**data)


@contextmanager
def fake_process_group(world_size: int):
    """A `fake` process group: collectives return at once, without data; rank 0 of `world_size`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the simulation needs its own (fake) process group; one is already initialised")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sampled_plan(noise: Noise):
    """Noise.plan that visits one chunk of each distinct kind of shard only.

    Shards of the same size, dtype and chunk alignment run exactly the same code on the same buffer, so
    the update phase's peak is the same as visiting every chunk of every shard (see the module docstring).
    """
    full_plan = noise.plan

    def plan(shards: list[Shard]) -> list[Piece]:
        seen, pieces = set(), []
        for i, shard in enumerate(shards):
            kind = (shard.numel, shard.data.dtype, shard.global_start % noise.chunk_numel)
            if kind not in seen:
                seen.add(kind)
                pieces.append(dataclasses.replace(full_plan([shard])[0], shard=i))
        return pieces

    return plan


def _backend(world_size: int, store: torch.dtype, compute: torch.dtype):
    """The real backend classes, with rank, device and precision set by hand (no process group to join)."""
    from zofsdp.parallel.fsdp2 import FSDP2Backend
    from zofsdp.parallel.none import NoneBackend

    if world_size == 1:
        backend = NoneBackend()
    else:
        backend = FSDP2Backend.__new__(FSDP2Backend)  # __init__ would join a real process group
        backend.rank, backend.world_size, backend.device = 0, world_size, torch.device("cpu")
    backend.store_dtype, backend.compute_dtype = store, compute
    return backend


def simulate(model_json: str | Path, world_size: int, dtype: str = "bf16", seq_len: int = 256,
             batch_size: int = 1, optimizers: list[str] | None = None, zo_cfg=None, compute_dtype: str = "") -> dict:
    """Per-rank (rank 0) peak bytes of inference and of each ZO optimizer's step, plus analytic references.
    `dtype` is the shards' (model.dtype), `compute_dtype` the forward's ("" = the same: see
    zofsdp.parallel.precision for the modes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from zofsdp.config import ZOConfig
    from zofsdp.optim import OPTIMIZERS
    from zofsdp.train import local_rows

    if dtype not in DTYPES or (compute_dtype and compute_dtype not in DTYPES):
        raise ValueError(f"--dtype and --compute-dtype must be one of {', '.join(DTYPES)}; got {dtype!r}, "
                         f"{compute_dtype!r}")
    store, compute = DTYPES[dtype], DTYPES[compute_dtype or dtype]
    if compute != store and store != torch.float32:
        raise ValueError("only fp32 shards can compute in another dtype (mixed precision)")
    config = load_model_config(model_json)
    optimizers = list(OPTIMIZERS) if optimizers is None else optimizers
    # One noise lane, as on a GPU: the figures must not depend on the simulating machine's cores.
    base_cfg = dataclasses.replace(zo_cfg or ZOConfig(), noise_threads=1)
    lo, hi = local_rows(batch_size, 0, world_size)
    rows = max(hi - lo, 1)  # a rank with no rows still runs a one-row forward (see train.global_loss)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.requires_grad_(False).eval()
    model.config.use_cache = False
    with fake_process_group(world_size):
        backend = _backend(world_size, store, compute)
        if world_size > 1:
            model = backend.wrap(model)  # on meta, outside fake mode (the device mesh needs real ops)
        # Parameters are fake; the optimizers' own small state stays real (they may read its values).
        # Real inputs are allowed: to_empty reads the meta tensors, the noise chunks are real.
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            model.to_empty(device="cpu")
            if world_size == 1:  # NoneBackend.wrap minus its `.to(device)`, which fake parameters refuse
                backend._remember(model)
                backend.model = model
                backend.apply_precision(model)
        result = _measure(model, backend, fake_mode, config.vocab_size, rows, seq_len, optimizers, base_cfg)
    result.update(stats=model_stats(config), rows_per_rank=rows)
    return result


def _measure(model, backend, fake_mode, vocab_size: int, rows: int, seq_len: int, optimizers, base_cfg) -> dict:
    """Inference and ZO steps of the fake model, with the same measurement code as a real run."""
    from zofsdp.optim import build_optimizer, param_shapes
    from zofsdp.scoring import loss_and_correct

    batch = synthetic_batch(vocab_size, rows, seq_len)
    losses = fake_losses()  # fake tensors hold no values: the optimizers get made-up losses

    def forward() -> float:
        loss_and_correct(model, batch)
        return losses()

    def forward_mode():
        return fake_mode

    if backend.probe is not None:
        _probe_outside_fake_mode(backend.probe)
    with fake_mode:
        forward()  # warm-up: FSDP2's lazy initialisation, outside the measurement
    shards, blocks = backend.shards(), backend.blocks()
    tracker = make_tracker(model)
    inference = measure_inference(tracker, forward, forward_mode)
    results = {}
    for name in optimizers:
        cfg = dataclasses.replace(base_cfg, optimizer=name)

        def build(cfg=cfg):
            opt = build_optimizer(cfg, shards, 0, "cpu", blocks=blocks, probe=backend.probe,
                                  all_reduce=backend.all_reduce_sum, shapes=param_shapes(backend))
            opt.noise.plan = _sampled_plan(opt.noise)
            return opt

        results[name] = measure_optimizer(tracker, name, build, forward, forward_mode=forward_mode)
    return {"inference": inference, "optimizers": results}


def _probe_outside_fake_mode(probe) -> None:
    """The bf16-shard probe hooks run inside the forward, under the fake mode, where each of their real
    chunk ops (randn, the 8-bit rounding) was re-dispatched as a fake op: ~0.1 s per tensor. Run them as
    the update phases do, with the fake mode popped: the fake parameters still dispatch to it, and the
    memory tracker (a separate mode) still counts every allocation."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    apply = probe.apply

    def apply_unfaked(name: str, tensor: torch.Tensor) -> None:
        with unset_fake_temporarily():
            apply(name, tensor)

    probe.apply = apply_unfaked


# ------------------------------------------------------------------------------------ hand calculations


def model_stats(config) -> dict:
    """Parameter counts of the whole model, of the largest decoder layer and of the root (non-layer) part."""
    from transformers import AutoModelForCausalLM

    from zofsdp.models import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layers = decoder_layers(model)
    layer = max(sum(p.numel() for p in m.parameters()) for m in layers)
    in_layers = sum(p.numel() for m in layers for p in m.parameters())
    return {"params": total, "layer_params": layer, "root_params": total - in_layers,
            "num_layers": len(layers), "hidden_size": config.hidden_size,
            "num_heads": config.num_attention_heads, "vocab_size": config.vocab_size,
            "ffn": getattr(config, "ffn_dim", None) or getattr(config, "intermediate_size", 4 * config.hidden_size)}


def hand_inference(stats: dict, world_size: int, bytes_per: int, rows: int, seq_len: int) -> dict:
    """params x bytes / ws + gathered parameters + the largest live activations, in bytes.

    Gathered, FSDP2 (ws > 1): the root's parameters (embeddings, final norm, head) stay gathered for the
    whole forward (the root's forward encloses every layer), plus two layers' gathered buffers (the one
    computing and the one being gathered or released). Activations: within one layer at a time (no
    backward keeps them): the MLP's hidden [rows, seq, ffn] in and out of the activation function, a few
    [rows, seq, hidden] tensors, and the attention scores [rows, heads, seq, seq] (fp32 softmax).
    """
    params = stats["params"] * bytes_per
    sharded = math.ceil(stats["params"] / world_size) * bytes_per
    gathered = 0
    if world_size > 1:
        gathered = (stats["root_params"] + 2 * stats["layer_params"]) * bytes_per
    tokens = rows * seq_len
    acts = bytes_per * tokens * (2 * stats["ffn"] + 4 * stats["hidden_size"])
    acts += 4 * rows * stats["num_heads"] * seq_len * seq_len * 2
    return {"params_total": params, "sharded_params": sharded, "gathered_params": gathered,
            "activations": acts, "total": sharded + gathered + acts}


def adamw_full_finetune(stats: dict, world_size: int, rows: int, seq_len: int) -> dict:
    """ANALYTIC: first-order AdamW full fine-tuning, mixed precision, fully sharded (ZeRO-3 / FSDP).

    Per parameter: 2 B bf16 weight + 2 B bf16 gradient + 4 B fp32 master + 8 B Adam moments = 16 B,
    divided by the world size; plus one gathered layer (bf16) and the activations a backward keeps,
    s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit (Korthikanti et al. 2022, no recomputation).
    """
    states = math.ceil(stats["params"] / world_size) * 16
    gathered = 2 * stats["layer_params"] * 2 if world_size > 1 else 0
    h, a, s = stats["hidden_size"], stats["num_heads"], seq_len
    saved = stats["num_layers"] * s * rows * h * (34 + 5 * a * s / h)
    logits = rows * s * stats["vocab_size"] * 4 * 2  # fp32 logits and their gradient for the LM loss
    total = int(states + gathered + saved + logits)
    return {"analytic": True, "params_grads_optimizer": states, "gathered_params": gathered,
            "activations": int(saved + logits), "total": total}


def zero3_zo(stats: dict, world_size: int, bytes_per: int, activations: int) -> dict:
    """ANALYTIC: a ZO step on DeepSpeed ZeRO-3 (zofsdp sets stage3_param_persistence_threshold=0).

    Every parameter partitioned (1/ws each); during a forward ZeRO-3 gathers one submodule at a time plus
    a prefetch bucket (stage3_prefetch_bucket_size, 5e7 elements by default); the embeddings and the head
    are gathered only around their own modules, not for the whole forward as FSDP2's root is.
    Activations are taken from the FSDP2 simulation (the same forward).
    """
    sharded = math.ceil(stats["params"] / world_size) * bytes_per
    gathered = 0
    if world_size > 1:
        biggest = max(stats["layer_params"], stats["root_params"] // 2)
        gathered = (biggest + int(5e7)) * bytes_per
    return {"analytic": True, "sharded_params": sharded, "gathered_params": gathered,
            "activations": activations, "total": sharded + gathered + activations}
