"""The bench's launch counts: the layout is FSDP2's, and the counts are what the layout implies."""

from __future__ import annotations

import json
import math

import torch

from zofsdp import kernels
from zofsdp.measure.launches import OPS_PER_PIECE, count, layout_shards, measured_tiny

TINY_OPT = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 4096, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 1003, "word_embed_proj_dim": 64,
            "max_position_embeddings": 130}


def _fsdp2_numels(model_json, world_size: int, rank: int) -> dict[str, int]:
    """name -> numel of rank's local shard, from FSDP2 itself under a fake process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM

    from zofsdp.measure.simulate import load_model_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(model_json))
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return {name: p.to_local().numel() for name, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_layout_is_fsdp2s(tmp_path):
    path = tmp_path / "tiny-opt.json"
    path.write_text(json.dumps(TINY_OPT))
    numels = [_fsdp2_numels(path, 3, rank) for rank in range(3)]  # uneven: 1003 vocabulary rows
    for rank in range(3):  # a rank's shard starts where the lower ranks' end (Shard(0), flat row-major)
        theirs = {name: (sum(numels[q][name] for q in range(rank)), n) for name, n in numels[rank].items() if n}
        assert {s.name: (s.global_start, s.numel) for s in layout_shards(path, 3, rank, "fp32")} == theirs


def test_counts_follow_the_layout(tmp_path):
    path = tmp_path / "tiny-opt.json"
    path.write_text(json.dumps(TINY_OPT))
    shards = layout_shards(path, 3, 1, "bf16")
    chunk = 1024
    got = count(shards, chunk)
    chunks = sum((s.global_start + s.numel - 1) // chunk - s.global_start // chunk + 1 for s in shards)
    assert got["chunked"]["chunk_ops_per_pass"] == chunks and got["chunked"]["chunk_ops_per_step"] == 3 * chunks
    assert got["chunked"]["kernels_per_step_est"] == chunks * (2 * OPS_PER_PIECE["perturb"] + OPS_PER_PIECE["update"])
    big = sum(s.numel >= kernels.GROUP_MIN for s in shards)
    assert 0 < big < len(shards)  # fc1/fc2 (4096 x 64 / 3 rows) launch alone; the rest share one launch
    assert got["fused"]["launches_per_pass"] == big + 1 and got["fused"]["grouped_shards"] == len(shards) - big


def test_measured_chunk_draws_equal_the_plan():
    got = measured_tiny(chunk_numel=4096)
    assert got["chunk_draws_per_step"] == got["chunked"]["chunk_ops_per_step"] > 0


def test_launch_plan_groups_small_shards_by_dtype():
    plan = kernels.plan_launches([10, 1 << 20, 0, 5, 1 << 16, 7],
                                 [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float32,
                                  torch.float32], group_min=1 << 16)
    assert plan.single == (1, 3, 4) and plan.groups == ((0, 5),) and plan.num_launches == 4  # 3: alone in bf16
    assert kernels.num_tiles(1024, 0, 256) == 1 and kernels.num_tiles(1024, 1, 256) == 2
    assert kernels.num_tiles(1, (1 << 40) + 3, 256) == 1
    assert math.isclose(kernels.num_tiles(10**6, 0, 256), 10**6 / 1024, rel_tol=1e-3)
