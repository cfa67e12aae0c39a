"""Batches of prompts -> candidate scores -> summed loss and number correct (the objective ZO optimizes)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from zofsdp.tasks import Example


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    candidate_ids: torch.Tensor
    """[rows, max candidates]: first token of each candidate answer."""
    candidate_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def rows(self, lo: int, hi: int) -> "Batch":
        return Batch(*(getattr(self, f.name)[lo:hi] for f in fields(self)))

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"candidate {text!r} encodes to no tokens")
    return ids[0]


def encode(tokenizer, examples: list[Example], max_length: int) -> Batch:
    """Left-padded prompts (the answer position is the last one) and candidate token ids."""
    tokenizer.truncation_side = "left"
    enc = tokenizer([e.prompt for e in examples], padding=True, truncation=True,
                    max_length=max_length, return_tensors="pt")
    mask = enc.attention_mask
    # With left padding, positions must count real tokens only, or the model sees shifted positions.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    width = max(len(e.candidates) for e in examples)
    cand = torch.zeros(len(examples), width, dtype=torch.long)
    cand_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids = [first_token(tokenizer, c) for c in e.candidates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidates {e.candidates} share a first token; pick distinct label words")
        cand[row, : len(ids)] = torch.tensor(ids)
        cand_mask[row, : len(ids)] = True
    labels = torch.tensor([e.label for e in examples])
    return Batch(enc.input_ids, mask, position_ids, cand, cand_mask, labels)


def candidate_scores(model, batch: Batch) -> torch.Tensor:
    """[rows, candidates] next-token logits of each candidate's first token after the prompt."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    scores = logits.gather(1, batch.candidate_ids)
    return scores.masked_fill(~batch.candidate_mask, float("-inf"))


def loss_and_correct(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the candidates, the number of rows whose best candidate is gold, and each
    row's loss (float64; CurvZO's score=snr_rows reads them).

    The sum is taken in float64 so that it does not depend on how the batch is split over ranks: the
    projected gradient divides a loss difference by 2ε and would amplify fp32 summation-order noise.
    """
    scores = candidate_scores(model, batch)
    rows = F.cross_entropy(scores, batch.labels, reduction="none").double()
    correct = (scores.argmax(dim=1) == batch.labels).sum()
    return rows.sum(), correct, rows


class PendingLoss:
    """A global batch's mean loss still on the device; its first use as a number reads it (one sync).

    Why: on a GPU, an optimizer that calls loss_fn() for ℓ₊, perturbs by −2εz and calls it again for ℓ₋
    then queues both probes' noise passes and forwards before it waits for either loss, instead of
    stalling the device between them. Optimizers need not know: it acts as the float it holds
    (arithmetic, comparisons, math.isfinite, formatting).
    """

    __slots__ = ("_totals", "_rows", "_value", "_wants_rows", "_per_example")
    __hash__ = None  # equal to a float by value, but not one: keep it out of sets and dict keys

    def __init__(self, totals: torch.Tensor, rows: int, per_example: bool = False):
        """`per_example`: totals[2:] holds each row's loss (train.enqueue_loss with `at`), read with the mean."""
        self._totals, self._rows, self._value = totals, rows, None
        self._wants_rows, self._per_example = per_example, None

    def __float__(self) -> float:
        if self._value is None:
            if self._wants_rows:  # one read for the mean and the rows
                values = self._totals.tolist()
                self._value, self._per_example = values[0] / self._rows, values[2:]
            else:
                self._value = self._totals[0].item() / self._rows
            self._totals = None
        return self._value

    @property
    def per_example(self) -> list[float] | None:
        """Each row's loss over the global batch, when the forward was asked for them; else None."""
        float(self)
        return self._per_example

    def __repr__(self) -> str:
        return f"PendingLoss({float(self)!r})"

    def __format__(self, spec: str) -> str:
        return format(float(self), spec)

    def __neg__(self): return -float(self)
    def __abs__(self): return abs(float(self))
    def __add__(self, other): return float(self) + float(other)
    def __radd__(self, other): return float(other) + float(self)
    def __sub__(self, other): return float(self) - float(other)
    def __rsub__(self, other): return float(other) - float(self)
    def __mul__(self, other): return float(self) * float(other)
    def __rmul__(self, other): return float(other) * float(self)
    def __truediv__(self, other): return float(self) / float(other)
    def __rtruediv__(self, other): return float(other) / float(self)
    def __eq__(self, other): return float(self) == float(other)
    def __ne__(self, other): return float(self) != float(other)
    def __lt__(self, other): return float(self) < float(other)
    def __le__(self, other): return float(self) <= float(other)
    def __gt__(self, other): return float(self) > float(other)
    def __ge__(self, other): return float(self) >= float(other)


def as_floats(record: dict) -> dict:
    """`record` with every PendingLoss read (what goes to metrics.jsonl and the seed log)."""
    return {k: float(v) if isinstance(v, PendingLoss) else v for k, v in record.items()}
