"""Merged-model scores of the closed forms against the iterative methods.

Uses ``eval_suite``'s offline synthetic benchmark (issue 4) through its
command line as documented there:

    python -m eval_suite synth build --size ci --out DIR      # DIR/base, DIR/experts/<task>
    python -m eval_suite run --model M --tasks synth --output results.json

Every method is merged with stock ``mergekit-yaml`` on a λ grid (λ means
different things for sum- and mean-initialised methods, PAPER.md §6.3, so
each method gets its best λ), the λ is chosen on the frozen ``val`` split and
the chosen merge is scored once on ``test`` (never selected on the split it
reports). When ``eval_suite`` does not
offer that command line yet, the section records why and the report says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.common import environment, log_progress, save_json
from benchmarks.whole_merge import mergekit_yaml, run_child
from mergekit_mllm.testing import recipe_for, write_recipe

# (label, method, parameters): the iterative methods and their closed forms.
METHODS: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("task_arithmetic", "task_arithmetic", {"weight": 1.0}),
    ("weight_average", "weight_average", {}),
    ("wudi (Adam, 300 steps)", "wudi", {}),
    ("wudi_exact", "wudi_exact", {}),
    ("swudi", "swudi", {}),
    ("aswudi", "aswudi", {}),
    ("optmerge lora (SGD, 300 steps)", "optmerge", {"variant": "lora"}),
    ("optmerge_exact lora", "optmerge_exact", {"variant": "lora"}),
    ("optmerge full (Adam, 300 steps)", "optmerge", {"variant": "full"}),
)
LAMBDAS = (0.1, 0.3, 0.5, 1.0)


def _eval_suite(*arguments: str) -> List[str]:
    return [sys.executable, "-m", "eval_suite", *arguments]


def available() -> Optional[str]:
    """None when eval_suite's command line is usable, else the reason."""
    try:
        import eval_suite  # noqa: F401
    except ImportError as error:
        return f"eval_suite is not importable ({error})"
    probe = subprocess.run(_eval_suite("run", "--help"), capture_output=True, text=True)
    if probe.returncode != 0:
        return "`python -m eval_suite run` is not available yet: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    return None


def _experts(family: Path) -> List[Path]:
    return sorted(p for p in (family / "experts").iterdir() if p.is_dir())


def _scores(results_path: Path) -> Dict[str, float]:
    data = json.loads(results_path.read_text())
    return {task: float(result["score"]) for task, result in data["tasks"].items()}


def run(
    device: torch.device,
    *,
    quick: bool = False,
    workdir: Optional[Path] = None,
    methods: Sequence[Tuple[str, str, Dict[str, Any]]] = METHODS,
    lambdas: Optional[Sequence[float]] = None,
    log=print,
) -> Dict[str, Any]:
    name = f"scores_{device.type}{'_quick' if quick else ''}"
    data: Dict[str, Any] = {"section": "scores", "environment": environment(device), "quick": quick}
    reason = available()
    if reason:
        data["not_run"] = reason
        save_json(name, data)
        log(f"scores: not run — {reason}")
        return data
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mergekit_mllm_scores_"))
    workdir.mkdir(parents=True, exist_ok=True)
    family = workdir / "synth_family"
    with log_progress("build the synthetic family", log):
        built = run_child(_eval_suite("synth", "build", "--size", "ci", "--out", str(family)), workdir / "build.log")
    if built["returncode"] != 0:
        data["not_run"] = "family build failed: " + (workdir / "build.log").read_text()[-500:]
        save_json(name, data)
        return data
    experts = _experts(family)
    lambdas = list(lambdas or ((1.0,) if quick else LAMBDAS))
    evaluate = ["--tasks", "synth", "--device", device.type] + (["--limit", "50"] if quick else [])
    validate = evaluate + ["--split", "val"]
    evaluate = evaluate + ["--split", "test"]
    data["models"] = {}
    for label, model in [("base", family / "base")] + [(f"expert {p.name}", p) for p in experts]:
        with log_progress(f"evaluate {label}", log):
            output = workdir / f"{label.replace(' ', '_')}.json"
            run_child(_eval_suite("run", "--model", str(model), "--output", str(output), *evaluate), workdir / "eval.log")  # test split
            data["models"][label] = _scores(output) if output.exists() else None
    data["merges"] = []
    for label, method, parameters in methods:
        sweep: Dict[float, Optional[float]] = {}
        outputs = {}
        for scale in lambdas:
            slug = f"{method}_{'_'.join(f'{k}{v}' for k, v in parameters.items())}_l{scale}"
            recipe = recipe_for(method, family / "base", experts, {**parameters, "lambda": scale})
            recipe_path = write_recipe(workdir / f"{slug}.yml", recipe)
            out = workdir / f"merged_{slug}"
            with log_progress(f"merge + validate {label} λ={scale}", log):
                command = [mergekit_yaml(), str(recipe_path), str(out)] + (["--cuda"] if device.type == "cuda" else [])
                merged = run_child(command, workdir / f"{slug}.merge.log")
                sweep[scale] = None
                if merged["returncode"] == 0:
                    output = workdir / f"{slug}.val.json"
                    run_child(_eval_suite("run", "--model", str(out), "--output", str(output), *validate), workdir / f"{slug}.eval.log")
                    if output.exists():
                        val = _scores(output)
                        sweep[scale] = sum(val.values()) / len(val)
                        outputs[scale] = (out, slug, merged["seconds"])
        scored = {k: v for k, v in sweep.items() if v is not None}
        scores, best, seconds = None, None, None
        if scored:
            best = max(scored, key=scored.get)
            out, slug, seconds = outputs[best]
            with log_progress(f"test {label} λ={best}", log):
                output = workdir / f"{slug}.test.json"
                run_child(_eval_suite("run", "--model", str(out), "--output", str(output), *evaluate), workdir / f"{slug}.eval.log")
                scores = _scores(output) if output.exists() else None
        data["merges"].append(
            {"label": label, "method": method, "parameters": parameters, "lambda": best,
             "val_sweep": {str(k): v for k, v in sweep.items()}, "merge_seconds": seconds, "scores": scores}
        )
        save_json(name, data)
    return data


def render(data: Dict[str, Any]) -> List[str]:
    if data.get("not_run"):
        return ["", f"*Not run ({data['environment']['device']}):* {data['not_run']}"]
    lines = ["", "Five synthetic tasks of `eval_suite` on `test` (mean score); λ per method chosen on `val` from the grid:", ""]
    tasks = sorted({t for s in data["models"].values() if s for t in s})
    lines += ["| model | λ | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]
    for label, scores in data["models"].items():
        if scores:
            lines.append(f"| {label} | | " + " | ".join(f"{scores[t]:.1f}" for t in tasks) + f" | {sum(scores.values()) / len(scores):.1f} |")
    best: Dict[str, Dict[str, Any]] = {}
    for merge in data["merges"]:
        if not merge["scores"]:
            continue
        mean = sum(merge["scores"].values()) / len(merge["scores"])
        if merge["label"] not in best or mean > best[merge["label"]]["mean"]:
            best[merge["label"]] = {**merge, "mean": mean}
    for label, merge in best.items():
        lines.append(
            f"| {label} | {merge['lambda']} | " + " | ".join(f"{merge['scores'][t]:.1f}" for t in tasks) + f" | {merge['mean']:.1f} |"
        )
    return lines
