"""Task registry: the five synthetic tasks and the paper's benchmark columns."""

from __future__ import annotations

from typing import Dict, List, Optional, Type

from eval_suite.tasks.base import EvalItem, ImageLoadError, ItemScore, Task, TaskError
from eval_suite.tasks.synth import SYNTH_TASKS

TASKS: Dict[str, Type[Task]] = dict(SYNTH_TASKS)
try:  # the paper's benchmarks
    from eval_suite.tasks.benchmarks import BENCHMARK_TASKS, PAPER_COLUMNS

    TASKS.update(BENCHMARK_TASKS)
except ImportError:  # pragma: no cover - during bootstrap only
    PAPER_COLUMNS = []

GROUPS: Dict[str, List[str]] = {
    "synth": list(SYNTH_TASKS),
    "paper": list(PAPER_COLUMNS),
}


def expand_task_names(spec: str) -> List[str]:
    """``synth``, ``paper`` or a comma-separated list of names/groups → task names (order kept)."""
    names: List[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        expanded = GROUPS.get(part, [part])
        for name in expanded:
            if name not in TASKS:
                raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise TaskError("no tasks given")
    return names


def make_task(name: str, *, split: Optional[str] = None, data_path: Optional[str] = None,
              revision: Optional[str] = None, options: Optional[dict] = None) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](split=split, data_path=data_path, revision=revision, options=options)


__all__ = ["EvalItem", "GROUPS", "ImageLoadError", "ItemScore", "TASKS", "Task", "TaskError", "expand_task_names", "make_task"]
