"""Run tasks against an adapter and write the results JSON incrementally."""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from eval_suite.adapters.base import Adapter, Request
from eval_suite.results import ResultsWriter
from eval_suite.tasks import make_task
from eval_suite.tasks.base import ImageLoadError, ItemScore, Task

logger = logging.getLogger("eval_suite")


def evaluate_task(adapter: Adapter, task: Task, *, limit: Optional[int] = None,
                  predictions_path: Optional[Path] = None) -> Dict[str, Any]:
    """Generate and score every item of ``task``; returns the task's results entry."""
    started = time.time()
    style = adapter.prompt_style
    items = task.load(limit)
    if not items:
        raise RuntimeError(f"task {task.name}: the {task.split!r} split is empty")
    requests: List[Request] = []
    request_index: Dict[int, int] = {}
    image_errors: Dict[int, str] = {}
    for position, item in enumerate(items):
        try:
            image = item.load_image()
        except ImageLoadError as exc:
            image_errors[position] = str(exc)
            continue
        item.meta["image_size"] = image.size  # (width, height): grounding normalises boxes with it
        request_index[position] = len(requests)
        requests.append(Request(task.prompt(item, style), image, task.max_new_tokens))
    generations = adapter.generate(requests, desc=task.name) if requests else []
    scores: List[ItemScore] = []
    predictions: List[Dict[str, Any]] = []
    for position, item in enumerate(items):
        if position in image_errors:
            score, text = ItemScore(0.0, parsed=False), ""
        else:
            generation = generations[request_index[position]]
            text = generation.text
            score = task.score_item(item, text, generation.info, style)
        scores.append(score)
        if predictions_path is not None:
            predictions.append({"id": item.id, "prediction": text, "answers": item.answers, "score": score.score,
                                "parsed": score.parsed, "extracted": _jsonable(score.extracted),
                                "error": image_errors.get(position)})
    aggregate = task.aggregate(items, scores)
    entry: Dict[str, Any] = {
        "score": round(float(aggregate.pop("score")), 4),
        **task.describe(style),
        "num_items": len(items),
        "parse_failures": sum(1 for s in scores if not s.parsed),
        "image_failures": len(image_errors),
        "metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in aggregate.pop("metrics", {}).items()},
        "limit": limit,
        "max_new_tokens": task.max_new_tokens,
        "seconds": round(time.time() - started, 2),
    }
    entry.update(aggregate)
    if image_errors:
        entry["image_failure_examples"] = list(image_errors.values())[:3]
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with open(predictions_path, "w") as handle:
            for row in predictions:
                handle.write(json.dumps(row) + "\n")
        entry["predictions_file"] = str(predictions_path)
    return entry


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def run_tasks(adapter: Adapter, task_names: Sequence[str], output, *, split: Optional[str] = None,
              limit: Optional[int] = None, data_paths: Optional[Dict[str, str]] = None,
              task_options: Optional[Dict[str, Any]] = None, save_predictions: bool = False,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate ``task_names`` in order, rewriting ``output`` after each; a failing task is
    recorded under ``errors`` and the run continues."""
    output = Path(output)
    writer = ResultsWriter(output, adapter.describe(), extra={"split_requested": split, "limit": limit})
    for name in task_names:
        try:
            task = make_task(name, split=split if _accepts_split(name, split) else None,
                             data_path=(data_paths or {}).get(name), options=task_options)
            predictions = output.with_suffix("").with_name(output.stem + ".predictions") / f"{name}.jsonl" if save_predictions else None
            entry = evaluate_task(adapter, task, limit=limit, predictions_path=predictions)
        except KeyboardInterrupt:
            writer.add_error(name, "interrupted")
            raise
        except Exception as exc:  # keep the finished tasks; report this one
            logger.debug("task %s failed", name, exc_info=True)
            writer.add_error(name, f"{type(exc).__name__}: {exc}")
            log(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            continue
        writer.add_task(name, entry)
        log(f"{name}: {entry['metric']} = {entry['score']:.2f} ({entry['num_items']} items, "
            f"{entry['parse_failures']} parse failures, {entry['seconds']:.0f} s)")
    return writer.finish()


def _accepts_split(name: str, split: Optional[str]) -> bool:
    """``--split val|test`` selects the synthetic tasks' frozen split; the paper's benchmarks
    always use the split the paper reports (e.g. VizWiz val, ChartQA test)."""
    if split is None:
        return False
    from eval_suite.tasks import TASKS
    from eval_suite.tasks.synth import SynthTask

    return issubclass(TASKS[name], SynthTask)
