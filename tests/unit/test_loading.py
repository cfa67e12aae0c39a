"""Loading and saving in one process: the streamed safetensors writer, the row reader, architecture JSONs."""

from __future__ import annotations

import json

import pytest
import torch

from zofsdp.config import ModelConfig
from zofsdp.errors import UserError
from zofsdp.loading import SafetensorsCheckpoint, empty_model, fill_from_checkpoint, load_lean, materialise
from zofsdp.models import load_model, resolve
from zofsdp.parallel.none import NoneBackend
from zofsdp.saving import save_sharded


def tiny(kind: str = "tiny-llama", dtype: str = "float32"):
    return load_model(ModelConfig(name_or_path=kind, dtype=dtype), 1000)


def backend_for(model) -> NoneBackend:
    backend = NoneBackend()
    backend.model = model
    return backend


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-opt"])
def test_streamed_save_in_several_files_reads_back_equal(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model = tiny(kind)
    save_sharded(backend_for(model), model, tmp_path / "out", None, max_file_bytes=100_000)
    folder = tmp_path / "out"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not (tmp_path / "out.tmp").exists()


def test_save_dtype_and_lean_reader(tmp_path):
    model = tiny()
    save_sharded(backend_for(model), model, tmp_path / "bf16", torch.bfloat16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    ckpt = SafetensorsCheckpoint(tmp_path / "bf16")
    assert ckpt.rows("model.embed_tokens.weight", 2, 5).dtype == torch.bfloat16
    # The lean path (meta build, no sharding) gives the bf16-rounded weights, buffers and ties intact.
    lean = load_lean(ModelConfig(name_or_path=str(tmp_path / "bf16")), 1000, lambda m: m, torch.device("cpu"))
    assert lean.lm_head.weight is lean.get_input_embeddings().weight
    assert torch.equal(lean.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    for key, value in model.state_dict().items():
        assert torch.equal(lean.state_dict()[key], value.to(torch.bfloat16).float()), key


def test_a_missing_tensor_is_an_error_not_garbage(tmp_path):
    from safetensors.torch import save_file

    model = tiny()
    save_sharded(backend_for(model), model, tmp_path / "m", None)
    state = SafetensorsCheckpoint(tmp_path / "m")
    kept = {k: state.rows(k, 0, 10**9) for k in state.files if "layers.1.mlp" not in k}
    save_file(kept, str(tmp_path / "m" / "model.safetensors"))
    empty = empty_model(model.config, torch.float32)
    materialise(empty, torch.device("cpu"))
    with pytest.raises(UserError, match="lacks 3 parameters"):
        fill_from_checkpoint(empty, SafetensorsCheckpoint(tmp_path / "m"))


def test_architecture_json_gives_a_random_model(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"_comment": "x", "model_type": "llama", "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "vocab_size": 500, "tie_word_embeddings": False}))
    cfg = ModelConfig(name_or_path=str(path))
    assert resolve(cfg) == path
    model = load_model(cfg, 1000)
    assert model.config.vocab_size == 1000  # grown to the tokenizer's ids
    std = model.model.embed_tokens.weight.std().item()
    assert 0.015 < std < 0.025 and torch.equal(model.model.norm.weight, torch.ones(32))
    again = load_model(cfg, 1000)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)  # reproducible
    with torch.no_grad():
        assert model(input_ids=torch.arange(8).view(1, 8)).logits.isfinite().all()
    with pytest.raises(FileNotFoundError, match="architecture JSON not found"):
        resolve(ModelConfig(name_or_path=str(tmp_path / "none.json")))


def test_model_tokenizer_names_the_tokenizer_folder(tmp_path):
    from zofsdp.errors import MissingFile
    from zofsdp.models import load_tokenizer

    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1}))
    own = load_tokenizer(ModelConfig(name_or_path=str(path)))  # borrowed: SmolLM2's
    own.add_special_tokens({"additional_special_tokens": ["<zofsdp-marker>"]})
    own.save_pretrained(tmp_path / "tok")
    chosen = load_tokenizer(ModelConfig(name_or_path=str(path), tokenizer=str(tmp_path / "tok")))
    assert len(chosen) == len(own) and "<zofsdp-marker>" in chosen.get_vocab()
    assert chosen.padding_side == "left"
    with pytest.raises(MissingFile, match="model.tokenizer: not a folder"):
        load_tokenizer(ModelConfig(name_or_path=str(path), tokenizer=str(tmp_path / "missing")))
