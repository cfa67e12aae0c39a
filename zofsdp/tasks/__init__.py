"""Task plug-ins: add a `Task` subclass and register it here; the trainer needs nothing else."""

from __future__ import annotations

from zofsdp.errors import UserError
from zofsdp.tasks.base import Example, Splits, Task, sample_splits
from zofsdp.tasks.glue import CB, RTE, SST2

TASKS: dict[str, type[Task]] = {t.name: t for t in (SST2, RTE, CB)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"data.task: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


__all__ = ["Example", "Splits", "Task", "TASKS", "get_task", "sample_splits"]
