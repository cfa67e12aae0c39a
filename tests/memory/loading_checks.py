"""Run under torchrun by test_loading.py: load a checkpoint into a backend, measure, compare, save.

    torchrun --standalone --nproc_per_node 3 tests/memory/loading_checks.py BACKEND MODE CKPT DTYPE OUT [SAVE]

BACKEND fsdp2 | deepspeed; MODE lean (the backend's load_model) | plain (every rank from_pretrained()s the
whole model, then FSDP2 shards it: the path before lean loading, kept to show the bound can fail).
Each rank writes OUT/rank<r>.json: the load report (zofsdp.measure.host), its logits' difference from a
plain one-process load (rank 0), whether its shard views alias FSDP2's storage after a forward, and, with
SAVE=1 (FSDP2), the save's host peak and the difference between the saved folder's logits and the model's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from zofsdp.config import load_config
from zofsdp.measure.host import host_peak
from zofsdp.parallel import build_backend

IDS = (torch.arange(1, 33).view(2, 16) * 37) % 1000


def plain_logits(folder: str, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits.float()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits.float()


def preload_modules(ckpt: str) -> None:
    """Import what loading imports (transformers' model code, accelerate, safetensors: ~70 MiB of anonymous
    memory, the same for any model size) before the baseline, so the figures are the model's."""
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))


def load(backend, cfg, mode: str):
    if mode == "lean":
        return backend.wrap(backend.load_model(cfg.model, 0))
    from zofsdp.models import load_model

    return backend._measure_load(lambda: backend.wrap(load_model(cfg.model, 0)))  # through the sharding


def views_alias(backend) -> bool:
    """Backend.shards() taken now must be the storage FSDP2 gathers from (after its lazy init)."""
    if backend.name != "fsdp2":
        return True
    return all(s.data.untyped_storage().data_ptr() == p.to_local().untyped_storage().data_ptr()
               for s, p in zip(backend.shards(), [p for p in backend.model.parameters() if p.to_local().numel()]))


def main(backend_name: str, mode: str, ckpt: str, dtype: str, out: str, save: bool) -> None:
    cfg = load_config(None, [f"model.name_or_path={ckpt}", f"model.dtype={dtype}",
                             f"parallel.backend={backend_name}"])
    backend = build_backend(backend_name, cfg=cfg)
    preload_modules(ckpt)
    model = load(backend, cfg, mode)
    shards_before = backend.shards() if backend.name == "fsdp2" else []
    got = logits(model)
    report = {"rank": backend.rank, "load": backend.load_report,
              "aliases": views_alias(backend) and all(
                  a.data.data_ptr() == b.data.data_ptr() for a, b in zip(shards_before, backend.shards()))}
    if save:  # before rank 0's plain loads below, which would leave freed pages for the save to reuse
        report.update(save_and_compare(backend, model, Path(out) / "saved", got, getattr(torch, dtype)))
    if backend.rank == 0:
        report["logits_max_diff"] = float((got - plain_logits(ckpt, getattr(torch, dtype))).abs().max())
    dist.barrier()
    (Path(out) / f"rank{backend.rank}.json").write_text(json.dumps(report))
    backend.close()


def save_and_compare(backend, model, folder: Path, got: torch.Tensor, dtype: torch.dtype) -> dict:
    """Save with files of ~1/4 of the model (so several ranks write), then reload on rank 0 and compare."""
    from zofsdp.saving import save_sharded

    full = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    with host_peak() as peak:
        save_sharded(backend, model, folder, None, max_file_bytes=full // 4)
    out = {"save": peak.as_dict()}
    if backend.rank == 0:
        out["saved_logits_max_diff"] = float((plain_logits(str(folder), dtype) - got).abs().max())
        out["saved_files"] = sorted(p.name for p in folder.glob("*.safetensors"))
        out["saved_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*args[:5], save=len(args) > 5 and args[5] == "1")
