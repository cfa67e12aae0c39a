"""Publishing converted checkpoints: complete or not at all, whichever rank writes, tied weights once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from zofsdp.config import ModelConfig
from zofsdp.models import load_model, missing_files, publish, write_hf_folder

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny(vocab: int = 128):
    return load_model(ModelConfig(name_or_path="tiny-llama"), vocab)


def test_written_folder_loads_to_the_same_logits_with_tied_weights_once(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = tiny()
    write_hf_folder(tmp_path, model, model.state_dict())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # the tie is written once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_incomplete_folder_counts_as_absent_and_is_rebuilt(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # what rank 1 published under transformers 5.24
    assert missing_files(target) == ["config.json", "model.safetensors"]
    calls = []

    def build(tmp):
        calls.append(tmp)
        model = tiny()
        write_hf_folder(tmp, model, model.state_dict())
        (tmp / "tokenizer.json").write_text("{}")

    assert publish(target, build) == target and len(calls) == 1
    assert missing_files(target) == []
    publish(target, build)  # complete now: not built again
    assert len(calls) == 1


def test_a_build_that_leaves_files_out_publishes_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="left out model.safetensors"):
        publish(target, lambda tmp: (tmp.mkdir(), (tmp / "config.json").write_text("{}")), tokenizer=False)
    assert not target.exists() and list(tmp_path.iterdir()) == [tmp_path / "model.lock"]


WRITE_AS_RANK_1 = """
import sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from zofsdp.config import ModelConfig
from zofsdp.models import load_model, write_hf_folder
dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
model = load_model(ModelConfig(name_or_path="tiny-llama"), 128)
write_hf_folder(sys.argv[1], model, model.state_dict())
"""


def test_a_rank_other_than_0_writes_the_weights(tmp_path):
    """transformers >= 5.24's save_pretrained skips the weights off rank 0; our writer must not."""
    subprocess.run([sys.executable, "-c", WRITE_AS_RANK_1, str(tmp_path)], check=True, cwd=ROOT, timeout=300)
    assert missing_files(tmp_path, tokenizer=False) == []
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
