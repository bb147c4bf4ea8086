"""Closed forms vs the iterative WUDI/OptMerge on the offline synthetic benchmark.

    python -m benchmarks.closed_form_scores FAMILY_DIR [FAMILY_DIR …] [--val-items 200] [--test-items 500]

FAMILY_DIR is a synthetic family built by ``python -m eval_suite synth build`` (e.g. the seeds
of ``python -m eval_suite synth study``). Same protocol as the study: every method's λ is picked
on the frozen ``val`` split from the paper's grid and the merged model is scored once on
``test``; merges run in-process through ``mergekit.merge_methods.api.merge_state_dicts``.
Results go to ``benchmarks/results/scores_closed_forms.json``; ``python -m benchmarks report``
renders them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.common import RESULTS_DIR, environment, save_json
from benchmarks.scores import METHODS as SCORE_METHODS

#: (label, method, parameters): each iterative method next to its closed forms — the scores
#: harness's table without its baselines, plus OptMerge-full's exact minimiser.
METHODS = tuple(m for m in SCORE_METHODS if m[1] not in ("task_arithmetic", "weight_average")) + (
    ("optmerge_exact full", "optmerge_exact", {"variant": "full"}),
)
LAMBDAS = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
NAME = "scores_closed_forms"


def run_family(family: Path, val_items: int, test_items: int, log=print) -> Dict[str, object]:
    from eval_suite.synth.family import EXPERTS, family_paths
    from eval_suite.synth.study import FamilyEvaluator, load_state, merge

    paths = family_paths(family)
    evaluator = FamilyEvaluator(paths["base"])
    base = load_state(paths["base"])
    experts = {name: load_state(paths[name]) for name in EXPERTS}
    rows: List[dict] = []
    for label, method, parameters in METHODS:
        t0 = time.time()
        sweep = {}
        for scale in LAMBDAS:
            scores = evaluator.evaluate(merge(method, scale, base, experts, parameters), "val", val_items)
            sweep[scale] = sum(scores.values()) / len(scores)
        best = max(sweep, key=sweep.get)
        t1 = time.time()
        merged = merge(method, best, base, experts, parameters)
        merge_seconds = time.time() - t1
        test = evaluator.evaluate(merged, "test", test_items)
        row = {"label": label, "method": method, "parameters": parameters, "lambda": best,
               "val_sweep": {str(k): round(v, 2) for k, v in sweep.items()}, "test": test,
               "test_average": sum(test.values()) / len(test), "merge_seconds": merge_seconds,
               "seconds": time.time() - t0}
        rows.append(row)
        log(f"{family.name}: {label} λ={best} → test average {row['test_average']:.2f} "
            f"(merge {merge_seconds:.1f} s)")
    return {"family": str(family), "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.closed_form_scores", description=__doc__)
    parser.add_argument("families", nargs="+", type=Path)
    parser.add_argument("--val-items", type=int, default=200)
    parser.add_argument("--test-items", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = RESULTS_DIR / f"{NAME}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({"section": "closed_form_scores", "environment": environment(torch.device("cpu")),
                 "val_items": args.val_items, "test_items": args.test_items})
    data.setdefault("families", {})
    for family in args.families:
        data["families"][family.name] = run_family(family, args.val_items, args.test_items)
        save_json(NAME, data)
    return 0


def render(data: Dict[str, object]) -> List[str]:
    families = list(data.get("families", {}).values())
    if not families:
        return []
    labels = [row["label"] for row in families[0]["rows"]]
    lines = [
        "",
        f"Closed forms against the iterative methods on the offline synthetic benchmark "
        f"(`python -m benchmarks.closed_form_scores`): λ chosen on `val` ({data['val_items']} items per task) "
        f"from the paper's grid, five-task average on `test` ({data['test_items']} items per task), per family seed:",
        "",
        "| method | " + " | ".join(f"{Path(f['family']).name} (λ)" for f in families) + " | mean |",
        "|---|" + "---|" * (len(families) + 1),
    ]
    for index, label in enumerate(labels):
        cells, values = [], []
        for family in families:
            row = family["rows"][index]
            cells.append(f"{row['test_average']:.2f} ({row['lambda']:g})")
            values.append(row["test_average"])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(values) / len(values):.2f} |")
    lines += _paired_lines(families)
    return lines


#: closed form → the iterative method with the same objective (OptMerge pairs within a variant)
ITERATIVE_OF = {"wudi_exact": "wudi", "swudi": "wudi", "aswudi": "wudi", "optmerge_exact": "optmerge"}


def _counterpart(row: dict, rows: List[dict]) -> Optional[str]:
    """Label of the iterative row that ``row`` (a closed form) is compared with, or None."""
    iterative = ITERATIVE_OF.get(row["method"])
    variant = row["parameters"].get("variant")
    return next((other["label"] for other in rows
                 if other["method"] == iterative and other["parameters"].get("variant") == variant), None)


def _paired_lines(families: List[dict]) -> List[str]:
    """Iterative − closed form per family seed (same family, same test items), against the seed spread."""
    import statistics

    def scores(label: str) -> List[float]:
        return [next(r["test_average"] for r in f["rows"] if r["label"] == label) for f in families]

    rows = []
    for row in families[0]["rows"]:
        label, other = row["label"], _counterpart(row, families[0]["rows"])
        if other is None:
            continue
        diffs = [a - b for a, b in zip(scores(other), scores(label))]
        mean = sum(diffs) / len(diffs)
        spread = max(statistics.stdev(scores(other)), statistics.stdev(scores(label))) if len(diffs) > 1 else float("nan")
        verdict = "yes" if len(diffs) > 1 and abs(mean) > spread and all(d * mean > 0 for d in diffs) else "no"
        rows.append(f"| {other} − {label} | " + ", ".join(f"{d:+.2f}" for d in diffs)
                    + f" | {mean:+.2f} | {spread:.2f} | {verdict} |")
    if not rows:
        return []
    return ["", "Paired differences, iterative − closed form (same family seed, same test items); "
            "\"beyond\" = |mean| larger than the larger seed-to-seed std of the two rows and the same sign in every seed:",
            "", "| comparison | per seed | mean | seed spread | beyond |", "|---|---|---|---|---|", *rows]


if __name__ == "__main__":
    raise SystemExit(main())
