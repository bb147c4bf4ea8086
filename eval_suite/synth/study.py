"""The sensitivity study behind ``SYNTH_RESULTS.md``.

For every family seed: build (or reuse) the family, evaluate the base and the
five experts, merge the experts with every method over a λ grid, pick each
method's λ on the frozen ``val`` split and score that λ on ``test``. Rows are
then summarised over seeds (mean ± sample standard deviation), together with
paired method-vs-method differences, which are what "differs by more than the
seed-to-seed spread" has to be judged on.

Merges run in memory through mergekit's ``merge_state_dicts`` with the
plugin's registered methods; every floating tensor (vision tower, projector,
language model, embeddings, norms, biases) is merged by the method.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from eval_suite.synth.family import EXPERTS, build_family, family_paths
from eval_suite.synth.tasks import CAPABILITIES, TASKS as SYNTH_TASK_SPECS

#: method → fixed parameters (λ comes from the grid); names as registered with mergekit
METHODS: Dict[str, dict] = {
    "weight_average": {},
    "task_arithmetic": {"weight": 1.0},
    "ties_merging": {},
    "dare_task_arithmetic": {"seed": 0},
    "dare_ties_merging": {"seed": 0},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
    "wudi": {},
    "optmerge": {"variant": "full"},
}
#: the paper's λ grid (§5.1); weight averaging has no λ in the paper
LAMBDA_GRID = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
SYNTH_TASK_NAMES = list(SYNTH_TASK_SPECS)


@dataclass
class Row:
    name: str
    scores: Dict[str, float]
    lam: Optional[float] = None
    val_average: Optional[float] = None
    val_sweep: Dict[float, float] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.scores[t] for t in SYNTH_TASK_NAMES) / len(SYNTH_TASK_NAMES)


class FamilyEvaluator:
    """One loaded synthetic model whose weights are swapped for each candidate."""

    def __init__(self, base_path: Path, batch_size: int = 64):
        from eval_suite.adapters import load_adapter

        self.adapter = load_adapter(base_path, batch_size=batch_size, progress=False)
        self.model = self.adapter.model

    def evaluate(self, state_dict: Dict[str, torch.Tensor], split: str, limit: int) -> Dict[str, float]:
        from eval_suite.runner import evaluate_task
        from eval_suite.tasks import make_task

        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        scores = {}
        for name in SYNTH_TASK_NAMES:
            entry = evaluate_task(self.adapter, make_task(name, split=split), limit=limit)
            scores[name] = entry["score"]
        return scores


def load_state(path: Path) -> Dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merge(method: str, lam: float, base: Dict[str, torch.Tensor], experts: Dict[str, Dict[str, torch.Tensor]],
          parameters: Optional[dict] = None):
    """In-process merge; ``parameters`` default to the study's settings for ``method``."""
    from mergekit.merge_methods.api import merge_state_dicts

    parameters = dict(METHODS[method] if parameters is None else parameters)
    parameters["lambda"] = lam
    models = {"base": base, **experts}
    with torch.no_grad():
        return merge_state_dicts(models, method, base="base", parameters=parameters)


def run_seed(out: Path, size: str, seed: int, *, methods: Sequence[str], lambdas: Sequence[float],
             val_items: int, test_items: int, threads: int, log: Callable[[str], None],
             size_overrides: Optional[dict] = None) -> Dict[str, object]:
    """One seed's family and study, with torch using ``threads`` threads meanwhile (restored after:
    a caller's later work, e.g. a kernel variant keyed by the thread count, is not affected)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_seed(out, size, seed, methods=methods, lambdas=lambdas, val_items=val_items,
                         test_items=test_items, threads=threads, log=log, size_overrides=size_overrides)
    finally:
        torch.set_num_threads(previous_threads)


def _run_seed(out: Path, size: str, seed: int, *, methods: Sequence[str], lambdas: Sequence[float],
              val_items: int, test_items: int, threads: int, log: Callable[[str], None],
              size_overrides: Optional[dict] = None) -> Dict[str, object]:
    family_dir = out / f"seed{seed}"
    manifest = build_family(family_dir, size, seed, threads=threads, log=log, size_overrides=size_overrides)
    settings = {"family_key": manifest["key"], "methods": list(methods), "lambdas": list(lambdas),
                "val_items": val_items, "test_items": test_items}
    cached = family_dir / "study.json"
    if cached.is_file():
        previous = json.loads(cached.read_text())
        if previous.get("settings") == settings:
            log(f"seed {seed}: reusing {cached}")
            return previous
    paths = family_paths(family_dir)
    evaluator = FamilyEvaluator(paths["base"])
    base = load_state(paths["base"])
    experts = {name: load_state(paths[name]) for name in EXPERTS}
    rows: List[Row] = []
    t0 = time.time()
    rows.append(Row("base", evaluator.evaluate(base, "test", test_items)))
    for name in EXPERTS:
        rows.append(Row(f"expert:{name}", evaluator.evaluate(experts[name], "test", test_items)))
    log(f"seed {seed}: base and experts scored in {time.time() - t0:.0f} s")
    for method in methods:
        grid = [1.0] if method == "weight_average" else list(lambdas)
        best: Optional[Tuple[float, float]] = None
        val_scores = {}
        for lam in grid:
            merged = merge(method, lam, base, experts)
            scores = evaluator.evaluate(merged, "val", val_items)
            average = sum(scores.values()) / len(scores)
            val_scores[lam] = round(average, 2)
            if best is None or average > best[1]:
                best = (lam, average)
        lam = best[0]
        test_scores = evaluator.evaluate(merge(method, lam, base, experts), "test", test_items)
        row = Row(method, test_scores, lam=lam, val_average=best[1], val_sweep=val_scores)
        rows.append(row)
        log(f"seed {seed}: {method} λ={lam} (val sweep {val_scores}) → test average {row.average:.2f}")
    result = {
        "seed": seed, "size": size, "family": manifest,
        "rows": [{"name": r.name, "scores": r.scores, "average": r.average, "lambda": r.lam, "val_average": r.val_average,
                  "val_sweep": {str(k): v for k, v in r.val_sweep.items()}}
                 for r in rows],
        "settings": settings,
    }
    (family_dir / "study.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarise(seed_results: Sequence[dict]) -> Dict[str, dict]:
    """Per row: mean and sample std over seeds of each task and the average."""
    names = [row["name"] for row in seed_results[0]["rows"]]
    summary: Dict[str, dict] = {}
    for name in names:
        per_seed = [next(r for r in result["rows"] if r["name"] == name) for result in seed_results]
        entry = {"lambda": [r["lambda"] for r in per_seed]}
        for key in SYNTH_TASK_NAMES + ["average"]:
            values = [r["scores"][key] if key != "average" else r["average"] for r in per_seed]
            entry[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)
        summary[name] = entry
    return summary


def paired_differences(seed_results: Sequence[dict], first: str, second: str) -> Tuple[float, float, List[float]]:
    diffs = []
    for result in seed_results:
        rows = {r["name"]: r["average"] for r in result["rows"]}
        diffs.append(rows[first] - rows[second])
    return statistics.mean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0), diffs


def val_lambda_table(seed_results: Sequence[dict]) -> Dict[str, Dict[str, float]]:
    """method → λ → mean over seeds of the val five-task average (the recipes' λ comes from here)."""
    table: Dict[str, Dict[str, float]] = {}
    for name in [row["name"] for row in seed_results[0]["rows"] if row.get("val_sweep")]:
        sweeps = [next(r for r in result["rows"] if r["name"] == name)["val_sweep"] for result in seed_results]
        table[name] = {lam: statistics.mean(sweep[lam] for sweep in sweeps) for lam in sweeps[0]}
    return table


def render_markdown(seed_results: Sequence[dict], command: str) -> str:
    summary = summarise(seed_results)
    seeds = [r["seed"] for r in seed_results]
    size = seed_results[0]["size"]
    header = ["model", "λ (per seed)"] + [t.replace("synth_", "") for t in SYNTH_TASK_NAMES] + ["average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary.items():
        lams = entry["lambda"]
        lam_text = "–" if all(l is None for l in lams) else ", ".join(f"{l:g}" for l in lams)
        cells = [f"{entry[t][0]:.1f} ± {entry[t][1]:.1f}" for t in SYNTH_TASK_NAMES + ["average"]]
        lines.append("| " + " | ".join([name, lam_text] + cells) + " |")
    table = "\n".join(lines)

    expert_names = [n for n in summary if n.startswith("expert:")]
    experts_best = max(expert_names, key=lambda n: summary[n]["average"][0])
    method_names = [n for n in summary if n in METHODS]
    ranked = sorted(method_names, key=lambda n: -summary[n]["average"][0])
    best_method = ranked[0] if ranked else None
    base_scores = summary["base"]

    # criterion 1: each expert beats the base on its own task by >= 15 points
    checks = []
    gains_ok = True
    for capability in EXPERTS:
        task = CAPABILITIES[capability]
        gains = [e - b for e, b in zip(summary[f"expert:{capability}"][task][2], base_scores[task][2])]
        ok = min(gains) >= 15.0
        gains_ok &= ok
        checks.append(f"  - expert:{capability} on {task}: {statistics.mean(gains):+.1f} points over the base "
                      f"(per seed {', '.join(f'{g:+.1f}' for g in gains)}) — {'meets' if ok else 'misses'} ≥ 15")

    # criterion 2: a merge beats the base and every expert on the average (in every seed)
    def beats_all(method: str) -> Tuple[bool, List[float]]:
        margins = []
        for result in seed_results:
            rows = {r["name"]: r["average"] for r in result["rows"]}
            others = [rows["base"]] + [rows[n] for n in expert_names]
            margins.append(rows[method] - max(others))
        return min(margins) > 0, margins

    winners = []
    for method in ranked:
        ok, margins = beats_all(method)
        if ok:
            winners.append(f"{method} (margin over the best of base/experts per seed: "
                           + ", ".join(f"{m:+.2f}" for m in margins) + ")")

    # criterion 3: paired method differences vs the seed-to-seed spread
    comparisons = []
    separated = []
    paired_separated = []

    def compare(first: str, second: str, force: bool = False) -> None:
        mean, std, diffs = paired_differences(seed_results, first, second)
        spread = max(summary[first]["average"][1], summary[second]["average"][1])
        same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
        distinct = abs(mean) > spread and same_sign
        paired = abs(mean) > 2 * std and same_sign
        if first in METHODS and second in METHODS:
            if distinct:
                separated.append(f"{first} > {second}")
            if paired:
                paired_separated.append(f"{first} > {second}")
        if force or distinct or paired:
            comparisons.append(f"| {first} − {second} | {mean:+.2f} | {std:.2f} | {spread:.2f} | "
                               + ", ".join(f"{d:+.2f}" for d in diffs)
                               + f" | {'yes' if distinct else 'no'} | {'yes' if paired else 'no'} |")

    for i, first in enumerate(ranked):
        for second in ranked[i + 1:]:
            compare(first, second, force=first == best_method)
    if best_method:
        for other in ["base", experts_best]:
            compare(best_method, other, force=True)

    val_table = val_lambda_table(seed_results)
    lambdas = sorted({lam for sweep in val_table.values() for lam in sweep}, key=float)
    val_lines = ["| method | " + " | ".join(f"λ={float(l):g}" for l in lambdas) + " | best λ |",
                 "|---|" + "---|" * (len(lambdas) + 1)]
    for method, sweep in val_table.items():
        best_lam = max(sweep, key=sweep.get)
        val_lines.append(f"| {method} | " + " | ".join(f"{sweep[l]:.1f}" if l in sweep else "–" for l in lambdas)
                         + f" | {float(best_lam):g} |")

    spread = {n: summary[n]["average"][1] for n in summary}
    val_items = seed_results[0].get("val_items", 500)
    test_items = seed_results[0].get("test_items", 500)
    text = [
        "# Synthetic benchmark: sensitivity results",
        "",
        f"Family size `{size}`, family seeds {', '.join(map(str, seeds))}; {test_items} items per task of the frozen "
        f"`test` split. Each method's λ is chosen per seed on the frozen `val` split ({val_items} items per task) "
        f"from the paper's grid {{{', '.join(f'{l:g}' for l in LAMBDA_GRID)}}} (weight average: λ = 1), then scored "
        "once on `test`. Cells: mean ± sample std over seeds (0–100).",
        "",
        "Reproduce:",
        "",
        "```bash",
        command,
        "```",
        "",
        table,
        "",
        "## Criteria (issue 4)",
        "",
        f"1. every expert beats the base on its own task by ≥ 15 points in every seed: **{'met' if gains_ok else 'not met'}**",
        *checks,
        f"2. a merge beats the base and every single expert on the five-task average in every seed: "
        f"**{'met' if winners else 'not met'}**" + (" — " + "; ".join(winners) if winners else
                                                    f" (best method {best_method}: {summary[best_method]['average'][0]:.1f}; "
                                                    f"best expert {experts_best}: {summary[experts_best]['average'][0]:.1f})"),
        f"3. method pairs whose paired difference exceeds the seed-to-seed spread (|mean| > the larger seed std of the "
        f"two, same sign in every seed): **{len(separated)}**" + (": " + ", ".join(separated) if separated else ""),
        f"   - weaker, paired view (|mean paired difference| > 2 × its std over seeds, same sign in every seed; "
        f"the family-level spread cancels in a paired difference): {len(paired_separated)} pairs"
        + (": " + ", ".join(paired_separated) if paired_separated else ""),
        "",
        "Seed-to-seed spread (sample std of the five-task average): "
        + ", ".join(f"{n} {s:.2f}" for n, s in spread.items()),
        "",
        "Paired differences of the five-task average (same seed, same test items):",
        "",
        "| comparison | mean | std of diff | seed spread | per seed | beyond seed spread | beyond 2 × std of diff |",
        "|---|---|---|---|---|---|---|",
        *comparisons,
        "",
        "## Build times (this study's builds, seconds)",
        "",
        *[f"- seed {r['seed']}: " + ", ".join(f"{k} {v:g}" for k, v in r["family"].get("seconds", {}).items())
          for r in seed_results],
        "",
        "## λ on val (mean five-task val average over seeds)",
        "",
        *val_lines,
    ]
    return "\n".join(text) + "\n"


def run_study(out, *, size: str = "full", seeds: Sequence[int] = (0, 1, 2), methods: Optional[Sequence[str]] = None,
              lambdas: Sequence[float] = LAMBDA_GRID, val_items: int = 500, test_items: int = 500, threads: int = 1,
              report: Optional[str] = None, command: str = "", log: Callable[[str], None] = print,
              size_overrides: Optional[dict] = None) -> List[dict]:
    out = Path(out)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    results = []
    for seed in seeds:
        result = run_seed(out, size, seed, methods=methods, lambdas=lambdas, val_items=val_items,
                          test_items=test_items, threads=threads, log=log, size_overrides=size_overrides)
        result.update({"val_items": val_items, "test_items": test_items})
        results.append(result)
    (out / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    if report:
        Path(report).write_text(render_markdown(results, command))
        log(f"wrote {report}")
    return results
