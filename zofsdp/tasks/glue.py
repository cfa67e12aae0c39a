"""Prompted classification tasks with MeZO's templates and label words."""

from __future__ import annotations

from zofsdp.tasks.base import Example, Task, label_index


class SST2(Task):
    """`<sentence> It was terrible|great` (label 0 = negative, 1 = positive)."""

    name = "sst2"
    files = {"train": "sst2/glue_train_full.tsv", "validation": "sst2/glue_dev.tsv"}
    hub = ("glue", "sst2")
    columns = ("sentence", "label")

    def example(self, row: dict) -> Example:
        sentence = row["sentence"]
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError("empty sentence")
        label = label_index(row["label"], ("0", "1"))
        return Example(f"{sentence.strip()} It was", (" terrible", " great"), label)


class RTE(Task):
    """`<premise>\\nDoes this mean that "<hypothesis>" is true? Yes or No?\\n` -> Yes (entailment) | No."""

    name = "rte"
    files = {"train": "rte/train.jsonl", "validation": "rte/val.jsonl"}
    hub = ("super_glue", "rte")
    columns = ("premise", "hypothesis", "label")

    def example(self, row: dict) -> Example:
        label = label_index(row["label"], ("entailment", "not_entailment"))
        prompt = f'{row["premise"]}\nDoes this mean that "{row["hypothesis"]}" is true? Yes or No?\n'
        return Example(prompt, ("Yes", "No"), label)


class CB(Task):
    """`Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\n` (MeZO's template)."""

    name = "cb"
    files = {"train": "cb/train.jsonl", "validation": "cb/val.jsonl"}
    hub = ("super_glue", "cb")
    columns = ("premise", "hypothesis", "label")

    def example(self, row: dict) -> Example:
        label = label_index(row["label"], ("entailment", "contradiction", "neutral"))
        prompt = f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, No, or Maybe?\n'
        return Example(prompt, ("Yes", "No", "Maybe"), label)
