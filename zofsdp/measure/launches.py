"""`zofsdp bench --sections launches`: noise work items per pass and per step, chunked vs fused.

Counts come from the shard layout alone, so a 30B model on 8 ranks is counted on one CPU: the model is
built on the `meta` device, each rank's FSDP2 shards are derived from its parameter shapes
(`layout_shards`), and they are planned by the same code that runs a pass:
- chunked (`gaussian`, `table`, `philox` off CUDA): `Noise.plan` pieces, one chunk operation each. Each
  piece costs a handful of kernels on a GPU: `OPS_PER_PIECE` counts the torch ops `Noise` issues per piece
  (randn/table slice, mul, two copies, add; the update adds one `add_` and, with weight decay, a `mul_`).
- fused (`philox` on CUDA): `kernels.plan_launches`, one launch per shard of >= GROUP_MIN elements and
  one per dtype for all smaller shards.
A MeZO step is three passes: +εz, −2εz, restore + update. The tiny model's counts are also *measured*:
one real MeZO step on CPU counts its chunk draws, which must equal the plan's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

OPS_PER_PIECE = {"perturb": 5, "update": 6, "update_with_decay": 7}
"""Kernels per piece on a GPU, read off noise.py: randn, mul, copy to bf16, copy back, add_ (perturb);
the same plus add_(z, alpha) (update), plus mul_ (weight decay)."""
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "configs" / "models" / "opt-30b.json"


def layout_shards(model_json: str | Path, world_size: int, rank: int = 0, dtype: str = "bf16"):
    """One rank's shards of the model under FSDP2 at `world_size` ranks, as meta tensors (no memory).

    FSDP2 places every parameter as Shard(0): rank r holds rows [r·c, min((r+1)·c, rows)) with
    c = ceil(rows / world_size) (torch.chunk), i.e. the flat global range starting at r·c·(row size).
    `tests/unit/test_launches.py` checks this against FSDP2 itself under a fake process group."""
    from transformers import AutoModelForCausalLM

    from zofsdp.measure.simulate import DTYPES, load_model_config
    from zofsdp.noise import Shard, block_id

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(model_json), dtype=DTYPES[dtype])
    shards = []
    for name, p in model.named_parameters():
        rows = p.shape[0] if p.dim() else 1
        row_numel = p.numel() // max(rows, 1)
        per = -(-rows // world_size)
        lo, hi = min(rank * per, rows), min((rank + 1) * per, rows)
        if hi > lo:
            data = torch.empty((hi - lo) * row_numel, dtype=p.dtype, device="meta")
            shards.append(Shard(name, data, lo * row_numel, p.numel(), block_id(name), p.dim() > 1, ""))
    return shards


def count(shards, chunk_numel: int = 1 << 16) -> dict:
    """Chunk operations and launches per pass and per MeZO step for one rank's shard list."""
    from zofsdp.kernels import GROUP_MIN, plan_launches
    from zofsdp.noise import Noise

    pieces = len(Noise(0, chunk_numel=chunk_numel).plan(shards))
    plan = plan_launches([s.numel for s in shards], [s.data.dtype for s in shards])
    ops = OPS_PER_PIECE
    return {
        "shards": len(shards), "elements": sum(s.numel for s in shards), "chunk_numel": chunk_numel,
        "group_min": GROUP_MIN,
        "chunked": {"chunk_ops_per_pass": pieces, "chunk_ops_per_step": 3 * pieces,
                    "kernels_per_step_est": pieces * (2 * ops["perturb"] + ops["update"]),
                    "kernels_per_step_est_with_decay": pieces * (2 * ops["perturb"] + ops["update_with_decay"])},
        "fused": {"launches_per_pass": plan.num_launches, "single_launches": len(plan.single),
                  "grouped_launches": len(plan.groups),
                  "grouped_shards": sum(len(g) for g in plan.groups),
                  "launches_per_step": 3 * plan.num_launches},
    }


def measured_tiny(chunk_numel: int = 1 << 16) -> dict:
    """One real MeZO step of the tiny model on CPU: chunk draws counted by Noise, beside the plan's count."""
    from zofsdp.config import ModelConfig, ZOConfig
    from zofsdp.models import load_model
    from zofsdp.optim.mezo import MeZO
    from zofsdp.parallel.none import NoneBackend

    model = load_model(ModelConfig(name_or_path="tiny-llama"), vocab_size=512)
    backend = NoneBackend()
    backend.wrap(model)
    shards = backend.shards()
    opt = MeZO(shards, ZOConfig(lr=0.0, chunk_numel=chunk_numel, noise="gaussian", noise_threads=1), seed=0)
    opt.step(lambda: 1.0, step=1)
    return {"chunk_draws_per_step": opt.noise.num_chunks_generated, **count(shards, chunk_numel)}


def section_launches(args: argparse.Namespace) -> dict:
    """Counts for rank 0 of `configs/models/opt-30b.json` on 8 ranks, the busiest rank beside it."""
    model_json, ranks = DEFAULT_MODEL, 8
    per_rank = [count(layout_shards(model_json, ranks, rank)) for rank in range(ranks)]
    busiest = max(r["chunked"]["chunk_ops_per_pass"] for r in per_rank)
    most_launches = max(r["fused"]["launches_per_pass"] for r in per_rank)
    return {"launches": {"model": Path(model_json).stem, "world_size": ranks, "rank": 0, **per_rank[0],
                         "max_over_ranks": {"chunk_ops_per_pass": busiest, "launches_per_pass": most_launches},
                         "tiny_measured": measured_tiny()}}


def markdown_rows(results: dict) -> list[str]:
    d = results["launches"]
    c, f, t = d["chunked"], d["fused"], d["tiny_measured"]
    return [(f"Noise work per rank (rank 0), {d['model']} on {d['world_size']} ranks (FSDP2 layout on the meta "
            f"device): {d['shards']} shards, {d['elements']:,} elements; a MeZO step is 3 passes:"), "",
            "| path | per pass | per step | kernels per step |", "|---|---|---|---|",
            (f"| chunked ({d['chunk_numel']:,}-element chunks) | {c['chunk_ops_per_pass']:,} chunk ops | "
            f"{c['chunk_ops_per_step']:,} | ≈ {c['kernels_per_step_est']:,} (est., "
            f"{c['kernels_per_step_est_with_decay']:,} with decay) |"),
            (f"| fused philox ({f['single_launches']} own + {f['grouped_launches']} grouped for "
            f"{f['grouped_shards']} shards < {d['group_min']:,}) | {f['launches_per_pass']:,} launches | "
            f"{f['launches_per_step']:,} | {f['launches_per_step']:,} |"), "",
            (f"Measured on tiny-llama (one CPU MeZO step): {t['chunk_draws_per_step']} chunk draws; "
            f"plan: {t['chunked']['chunk_ops_per_step']}; fused: {t['fused']['launches_per_step']} launches."),
            (f"Busiest of the {d['world_size']} ranks: {d['max_over_ranks']['chunk_ops_per_pass']:,} chunk ops, "
             f"{d['max_over_ranks']['launches_per_pass']:,} fused launches per pass."), ""]
