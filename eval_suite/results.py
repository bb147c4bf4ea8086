"""The results JSON other parts of the project read, written incrementally.

Schema (extra keys are allowed; these are required)::

    {"suite": "eval_suite", "suite_version": "...", "created": "<ISO-8601 UTC>",
     "model": {"path", "name", "dtype", "attn_implementation", "device", "adapter"},
     "tasks": {"<task>": {"score" (0–100), "metric", "num_items", "parse_failures",
               "dataset_id", "dataset_revision", "split", "prompt_version",
               "task_type", "capability"}}}

:class:`ResultsWriter` rewrites the file atomically after every finished task,
so a crash (or Ctrl-C) never loses the tasks already scored; a task that fails
is recorded under ``"errors"`` and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

SUITE = "eval_suite"
MODEL_KEYS = ("path", "name", "dtype", "attn_implementation", "device", "adapter")
TASK_KEYS = (
    "score", "metric", "num_items", "parse_failures", "dataset_id", "dataset_revision",
    "split", "prompt_version", "task_type", "capability",
)
TOP_KEYS = ("suite", "suite_version", "created", "model", "tasks")


class ResultsError(ValueError):
    """A results file is missing, unreadable or does not follow the schema; the message names it."""


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def validate_results(data: Any, source: str = "<results>") -> Dict[str, Any]:
    """Check ``data`` against the schema; raise :class:`ResultsError` naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise ResultsError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in TOP_KEYS:
        if key not in data:
            raise ResultsError(f"{source}: missing key '{key}'")
    if data["suite"] != SUITE:
        raise ResultsError(f"{source}: 'suite' is {data['suite']!r}, expected {SUITE!r}")
    if not isinstance(data["model"], dict):
        raise ResultsError(f"{source}: 'model' must be an object")
    for key in MODEL_KEYS:
        if key not in data["model"]:
            raise ResultsError(f"{source}: missing key 'model.{key}'")
    if not isinstance(data["tasks"], dict):
        raise ResultsError(f"{source}: 'tasks' must be an object mapping task names to results")
    for name, task in data["tasks"].items():
        if not isinstance(task, dict):
            raise ResultsError(f"{source}: 'tasks.{name}' must be an object")
        for key in TASK_KEYS:
            if key not in task:
                raise ResultsError(f"{source}: missing key 'tasks.{name}.{key}'")
        score = task["score"]
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score) or not 0 <= score <= 100:
            raise ResultsError(f"{source}: 'tasks.{name}.score' must be a number in [0, 100], got {score!r}")
    return data


def load_results(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and validate a results file written by ``python -m eval_suite run``."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc})") from exc
    return validate_results(data, str(path))


def _atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ResultsWriter:
    """Accumulates task results and rewrites ``path`` after each change."""

    def __init__(self, path: Union[str, Path], model: Mapping[str, Any], *, extra: Optional[Mapping[str, Any]] = None):
        from eval_suite import __version__

        missing = [key for key in MODEL_KEYS if key not in model]
        if missing:
            raise ResultsError(f"model description lacks {', '.join(missing)}")
        self.path = Path(path)
        self.data: Dict[str, Any] = {
            "suite": SUITE,
            "suite_version": __version__,
            "created": utc_now(),
            "status": "running",
            "model": dict(model),
            "tasks": {},
            "errors": {},
        }
        if extra:
            self.data.update(extra)
        self.flush()

    def add_task(self, name: str, result: Mapping[str, Any]) -> None:
        missing = [key for key in TASK_KEYS if key not in result]
        if missing:
            raise ResultsError(f"task {name!r} result lacks {', '.join(missing)}")
        self.data["tasks"][name] = dict(result)
        self.data["errors"].pop(name, None)
        self.flush()

    def add_error(self, name: str, message: str) -> None:
        self.data["errors"][name] = message
        self.flush()

    def finish(self) -> Dict[str, Any]:
        self.data["status"] = "complete" if not self.data["errors"] else "complete_with_errors"
        self.data["finished"] = utc_now()
        self.flush()
        return self.data

    def flush(self) -> None:
        _atomic_write_json(self.path, self.data)
