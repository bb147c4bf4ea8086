"""eval_suite results files: read them and tell whose scores they are.

Format (eval_suite, scores 0-100)::

    {"suite": "eval_suite", "suite_version": "0.1.0", "created": "...",
     "model": {"path": "/abs/OUT", "name": "OUT", "dtype": ..., "attn_implementation": ...,
               "device": ..., "adapter": ...},
     "tasks": {"synth_chart": {"score": 71.2, "metric": "relaxed_accuracy", "num_items": 500,
               "parse_failures": 0, "dataset_id": "...", "dataset_revision": "v1", "split": "test",
               "prompt_version": "synth-v1", "task_type": "visual-question-answering",
               "capability": "chart"}}}

The file whose ``model.path`` resolves to the output folder holds the merged
model's scores; every other file must be the base's or an expert's
(identified by ``model.path`` or ``model.name``), or the push is refused: a
card must never show another model's numbers as this merge's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mergekit_mllm.hub.errors import ResultsError
from mergekit_mllm.hub.output import MergedOutput, ModelRef

SUITE = "eval_suite"


@dataclass(frozen=True)
class TaskScore:
    task: str
    score: float
    metric: str
    dataset_id: str
    split: Optional[str] = None
    dataset_revision: Optional[str] = None
    prompt_version: Optional[str] = None
    task_type: Optional[str] = None
    capability: Optional[str] = None
    num_items: Optional[int] = None
    parse_failures: Optional[int] = None


@dataclass(frozen=True)
class ResultsFile:
    source: Path
    suite_version: Optional[str]
    created: Optional[str]
    model: Dict[str, Any]
    tasks: Dict[str, TaskScore]

    @property
    def model_path(self) -> Optional[str]:
        return self.model.get("path")

    @property
    def model_name(self) -> Optional[str]:
        return self.model.get("name")

    @property
    def described(self) -> str:
        return f"model {self.model_name!r} at {self.model_path!r}"


@dataclass(frozen=True)
class EvalSet:
    """Results sorted by model: the merged one, the base, the experts (recipe order)."""

    merged: Optional[ResultsFile] = None
    base: Optional[ResultsFile] = None
    experts: Tuple[Tuple[ModelRef, ResultsFile], ...] = ()
    notes: Tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.merged is None and self.base is None and not self.experts

    def columns(self, base_label: str) -> List[Tuple[str, ResultsFile]]:
        """(label, results) in table order: merged, base, experts."""
        columns = []
        if self.merged is not None:
            columns.append(("This merge", self.merged))
        if self.base is not None:
            columns.append((f"Base ({base_label})", self.base))
        columns += [(ref.label, results) for ref, results in self.experts]
        return columns

    def task_names(self) -> List[str]:
        names: List[str] = []
        for results in [self.merged, self.base, *(r for _, r in self.experts)]:
            for task in (results.tasks if results else {}):
                if task not in names:
                    names.append(task)
        return names


def _require(condition: bool, source: Path, message: str) -> None:
    if not condition:
        raise ResultsError(f"{source}: {message}")


def _task(source: Path, name: str, raw: Any) -> TaskScore:
    _require(isinstance(raw, dict), source, f"tasks.{name} must be an object")
    score = raw.get("score")
    _require(
        isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score),
        source, f"tasks.{name}.score must be a number (got {score!r})",
    )
    _require(0.0 <= score <= 100.0, source, f"tasks.{name}.score is {score}: eval_suite scores are 0-100")
    for key in ("metric", "dataset_id"):
        _require(isinstance(raw.get(key), str) and raw[key], source, f"tasks.{name}.{key} is required")
    optional_text = ("split", "dataset_revision", "prompt_version", "task_type", "capability")
    for key in optional_text:
        _require(raw.get(key) is None or isinstance(raw[key], str), source, f"tasks.{name}.{key} must be a string")
    return TaskScore(
        task=name,
        score=float(score),
        metric=raw["metric"],
        dataset_id=raw["dataset_id"],
        num_items=raw.get("num_items"),
        parse_failures=raw.get("parse_failures"),
        **{key: raw.get(key) for key in optional_text},
    )


def load_results(path: Path) -> ResultsFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ResultsError(f"results file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: not readable JSON ({exc})") from exc
    _require(isinstance(data, dict), path, "must contain a JSON object")
    _require(data.get("suite") == SUITE, path, f'"suite" must be "{SUITE}" (got {data.get("suite")!r})')
    model = data.get("model")
    _require(isinstance(model, dict) and (model.get("path") or model.get("name")), path,
             '"model" must name the evaluated model ("path" and/or "name")')
    tasks = data.get("tasks")
    _require(isinstance(tasks, dict) and tasks, path, '"tasks" must be a non-empty object')
    return ResultsFile(
        source=path,
        suite_version=data.get("suite_version"),
        created=data.get("created"),
        model=dict(model),
        tasks={name: _task(path, name, raw) for name, raw in tasks.items()},
    )


def _path_is(recorded: Optional[str], local: Optional[Path]) -> bool:
    if not recorded or local is None:
        return False
    try:
        return Path(recorded).expanduser().resolve() == local
    except OSError:
        return False


def _is_merged(results: ResultsFile, out: Path) -> bool:
    if _path_is(results.model_path, out):
        return True
    # Evaluated on another machine: the recorded path does not exist here, so
    # fall back to the folder name eval_suite records as model.name.
    recorded = results.model_path
    moved = not recorded or not Path(recorded).expanduser().exists()
    return moved and results.model_name == out.name


def _is_model(results: ResultsFile, ref: ModelRef) -> bool:
    if _path_is(results.model_path, ref.local_path):
        return True
    names = {ref.reference, ref.hub_id, str(ref.local_path) if ref.local_path else None} - {None}
    return results.model_path in names or results.model_name in names


def _consistency_notes(merged: ResultsFile, others: Sequence[Tuple[str, ResultsFile]]) -> List[str]:
    """Comparisons are only fair on the same data, prompts and scorer."""
    notes = []
    for label, results in others:
        for name, task in results.tasks.items():
            mine = merged.tasks.get(name)
            if mine is None:
                continue
            for key in ("prompt_version", "dataset_revision", "split", "metric"):
                if getattr(mine, key) != getattr(task, key):
                    notes.append(
                        f"{label}, task {name}: {key} {getattr(task, key)!r} differs from this merge's "
                        f"{getattr(mine, key)!r}; the scores are not directly comparable."
                    )
    return notes


def match_results(files: Sequence[ResultsFile], output: MergedOutput) -> EvalSet:
    merged: Optional[ResultsFile] = None
    base: Optional[ResultsFile] = None
    experts: Dict[int, ResultsFile] = {}
    for results in files:
        if _is_merged(results, output.path):
            if merged is not None:
                raise ResultsError(
                    f"two results files are for the merged model {output.path}: {merged.source} and {results.source}"
                )
            merged = results
            continue
        if output.base is not None and _is_model(results, output.base):
            if base is not None:
                raise ResultsError(f"two results files are for the base model: {base.source} and {results.source}")
            base = results
            continue
        index = next((i for i, ref in enumerate(output.experts) if _is_model(results, ref)), None)
        if index is None:
            known = [output.base.reference] if output.base else []
            known += [ref.reference for ref in output.experts]
            raise ResultsError(
                f"{results.source} holds results for {results.described}, which is not this merge "
                f"({output.path}) nor one of its inputs ({', '.join(known) or 'none recorded'}). "
                "Pass the results of the merged model (eval_suite run on this folder) and, for comparison, "
                "of its base and experts."
            )
        if index in experts:
            raise ResultsError(
                f"two results files are for expert {output.experts[index].reference}: "
                f"{experts[index].source} and {results.source}"
            )
        experts[index] = results
    expert_rows = tuple((output.experts[i], experts[i]) for i in sorted(experts))
    notes: List[str] = []
    if merged is None and files:
        notes.append("No results for this merged model were given: the card shows its inputs' scores only.")
    if merged is not None:
        others = [("base", base)] if base else []
        others += [(ref.label, r) for ref, r in expert_rows]
        notes += _consistency_notes(merged, others)
    return EvalSet(merged=merged, base=base, experts=expert_rows, notes=tuple(notes))
