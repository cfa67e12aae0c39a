"""Configs load, and every mistake a user can make gets an error that names it."""

from pathlib import Path

import pytest

from zofsdp.config import RunConfig, load_config
from zofsdp.models import resolve
from zofsdp.config import ModelConfig
from zofsdp.tasks import get_task, sample_splits

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    lines = path.read_text().splitlines()
    header = " ".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])
    assert lines[0].startswith("#") and ("zofsdp" in header or "launch/" in header), header


def test_overrides_are_typed():
    cfg = load_config(None, ["zo.lr=1e-5", "train.steps=7", "train.save_model=false", "model.dtype=bfloat16"])
    assert cfg.zo.lr == 1e-5 and cfg.train.steps == 7 and cfg.train.save_model is False
    assert cfg.model.dtype == "bfloat16"


def test_misspelt_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key 'zo\.learning_rate'.*valid keys here:.*\blr\b"):
        load_config(None, ["zo.learning_rate=1e-5"])


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="model.dtype"):
        load_config(None, ["model.dtype=fp8"])
    with pytest.raises(ValueError, match="train.steps"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ValueError, match="zo.eps"):
        load_config(None, ["zo.eps=0"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["zo.lr"])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config("no/such.yaml")


def test_missing_model_path():
    with pytest.raises(FileNotFoundError, match="folder not found"):
        resolve(ModelConfig(name_or_path="./no/such/model"))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve(ModelConfig(name_or_path="/tmp/none.gguf"))


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.dir not found"):
        sample_splits(get_task("sst2"), str(tmp_path / "nothing"), 10, 0, 10, 0)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'sst3'.*sst2"):
        get_task("sst3")


def test_malformed_data_files(tmp_path):
    (tmp_path / "sst2").mkdir()
    dev = tmp_path / "sst2" / "glue_dev.tsv"
    dev.write_text("sentence\tlabel\ngood film\t1\n")
    train = tmp_path / "sst2" / "glue_train_full.tsv"
    train.write_text("text\tlabel\ngood film\t1\n")  # wrong column name
    with pytest.raises(ValueError, match="lacks columns \\['sentence'\\]"):
        sample_splits(get_task("sst2"), str(tmp_path), 1, 0, 1, 0)
    train.write_text("sentence\tlabel\ngood film\t7\n")  # label out of range
    with pytest.raises(ValueError, match="row 0 is malformed"):
        sample_splits(get_task("sst2"), str(tmp_path), 1, 0, 1, 0)
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{oops\n')
    (tmp_path / "rte" / "val.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n')
    with pytest.raises(ValueError, match="cannot parse"):
        sample_splits(get_task("rte"), str(tmp_path), 1, 0, 1, 0)


def test_sst2_sampling_follows_mezo():
    from zofsdp.config import default_data_dir

    splits = sample_splits(get_task("sst2"), default_data_dir(), 1000, 500, 1000, seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (1000, 500, 872)
    assert not {e.prompt for e in splits.train} & {e.prompt for e in splits.dev}
    assert splits.train[0].prompt.endswith(" It was") and splits.train[0].candidates == (" terrible", " great")
    again = sample_splits(get_task("sst2"), default_data_dir(), 1000, 500, 1000, seed=0)
    assert again.train == splits.train
