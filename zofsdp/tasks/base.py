"""A task = where its rows come from + how a row becomes a prompt with candidate answers.

The trainer knows only `Example`s: a prompt, the candidate continuations (label words) and the gold index.
The loss is MeZO's classification objective: cross-entropy over the candidates' first-token logits at the
position after the prompt; accuracy takes the best-scoring candidate.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from zofsdp.errors import MissingFile, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    candidates: tuple[str, ...]
    label: int


class Task:
    """Subclasses set `name`, `files` (split -> path under data.dir), `hub` and write `example`."""

    name: str = ""
    files: dict[str, str] = {}
    """split ('train' | 'validation') -> file under data.dir (tsv or jsonl)."""
    hub: tuple[str, str] = ("", "")
    """(dataset, config) on the Hugging Face hub, used when data.dir is empty."""
    columns: tuple[str, ...] = ()

    def example(self, row: dict) -> Example:
        raise NotImplementedError

    def rows(self, data_dir: str, split: str) -> list[dict]:
        import datasets

        if not data_dir:
            try:
                return list(datasets.load_dataset(*self.hub, split=split))
            except Exception as err:  # no network, no such dataset, a broken cache: all end here
                raise UserError(f"{self.name}: cannot load {'/'.join(self.hub)} from the Hugging Face hub "
                                f"({type(err).__name__}: {err}); set data.dir to a folder with the task "
                                "files (e.g. ../shared/data)") from err
        path = Path(data_dir) / self.files[split]
        if not Path(data_dir).is_dir():
            raise MissingFile(f"data.dir not found: {data_dir} (set data.dir, or '' to use the hub)")
        if not path.is_file():
            raise MissingFile(f"{self.name}: {split} file not found: {path}")
        try:
            if path.suffix == ".tsv":
                ds = datasets.load_dataset(
                    "csv", data_files=str(path), delimiter="\t", quoting=csv.QUOTE_NONE, split="train"
                )
            else:
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # datasets raises several types for unreadable files
            raise UserError(f"{self.name}: cannot parse {path}: {err}") from err
        missing = [c for c in self.columns if c not in ds.column_names]
        if missing:
            raise UserError(f"{self.name}: {path} lacks columns {missing} (has {ds.column_names})")
        return list(ds)

    def examples(self, data_dir: str, split: str) -> list[Example]:
        rows = self.rows(data_dir, split)
        out = []
        for index, row in enumerate(rows):
            try:
                out.append(self.example(row))
            except (KeyError, ValueError, TypeError) as err:
                raise UserError(f"{self.name} {split} row {index} is malformed ({err!r}): {row}") from err
        return out


def label_index(value, names: tuple[str, ...]) -> int:
    """Labels arrive as ints (hub, GLUE tsv) or as strings (jsonl files); both map to an index."""
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if value not in names:
            raise ValueError(f"label {value!r} not in {names}")
        return names.index(value)
    index = int(value)
    if not 0 <= index < len(names):
        raise ValueError(f"label {index} out of range for {len(names)} classes")
    return index


@dataclass(slots=True)
class Splits:
    train: list[Example]
    dev: list[Example]
    eval: list[Example]


def sample_splits(task: Task, data_dir: str, num_train: int, num_dev: int, num_eval: int, seed: int) -> Splits:
    """MeZO's sampling: train and dev drawn disjointly from the train file, eval from the validation file."""
    pool = task.examples(data_dir, "train")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if num_train + num_dev > len(pool):
        log.warning("%s: asked for %d train + %d dev but the train split has %d rows; using what is there",
                    task.name, num_train, num_dev, len(pool))
    train = [pool[i] for i in order[:num_train]]
    dev = [pool[i] for i in order[num_train : num_train + num_dev]]
    held_out = task.examples(data_dir, "validation")
    order = list(range(len(held_out)))
    random.Random(seed + 1).shuffle(order)
    evaluation = [held_out[i] for i in order[:num_eval]]
    if not train:
        raise UserError(f"{task.name}: no training examples (data.num_train={num_train})")
    return Splits(train, dev, evaluation)
