"""``mergekit-mllm sweep``: choose λ on a validation split.

For each λ of the grid the recipe is merged with the stock ``mergekit-yaml``
and the result evaluated with ``eval_suite`` on the *validation* split (the
paper picked λ on evaluation results; selecting on the test split would leak
it, so ``--split test`` is refused). The λ with the best mean score wins;
the sweep writes the chosen recipe, a table, a plot and the raw numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import click
import yaml

from mergekit_mllm.main_job import run_stock_mergekit_yaml

PAPER_GRID = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)


@dataclass
class SweepPoint:
    lam: float
    scores: Dict[str, float]  # task -> score (0-100)
    results_path: Path

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


Evaluator = Callable[[Path, Path], Dict[str, float]]  # (model dir, results path) -> task scores


def eval_suite_evaluator(tasks: str, split: str, limit: Optional[int], device: Optional[str]) -> Evaluator:
    """Evaluate with ``python -m eval_suite run`` and read its results file."""

    def evaluate(model: Path, results: Path) -> Dict[str, float]:
        command = [sys.executable, "-m", "eval_suite", "run", "--model", str(model), "--tasks", tasks,
                   "--split", split, "--output", str(results)]
        if limit is not None:
            command += ["--limit", str(limit)]
        if device:
            command += ["--device", device]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise click.ClickException(f"evaluation of {model} failed:\n{completed.stderr[-4000:]}")
        from eval_suite.results import load_results

        data = load_results(results)
        return {task: float(entry["score"]) for task, entry in data["tasks"].items()}

    return evaluate


def recipe_with_lambda(recipe: dict, lam: float) -> dict:
    recipe = json.loads(json.dumps(recipe))
    recipe.setdefault("parameters", {})["lambda"] = lam
    return recipe


def header_comments(text: str) -> List[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def best_point(points: Sequence[SweepPoint]) -> SweepPoint:
    """Highest mean; ties go to the smaller λ (closer to the base)."""
    return max(points, key=lambda p: (round(p.mean, 9), -p.lam))


def write_table(points: Sequence[SweepPoint], chosen: SweepPoint, split: str, path: Path) -> None:
    tasks = sorted(points[0].scores)
    lines = [f"| λ | {' | '.join(tasks)} | mean ({split}) |", "|---|" + "---|" * (len(tasks) + 1)]
    for point in points:
        mark = " **← chosen**" if point is chosen else ""
        cells = " | ".join(f"{point.scores[t]:.2f}" for t in tasks)
        lines.append(f"| {point.lam:g} | {cells} | {point.mean:.2f}{mark} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(points: Sequence[SweepPoint], chosen: SweepPoint, split: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [p.lam for p in points]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for task in sorted(points[0].scores):
        axes.plot(lams, [p.scores[task] for p in points], marker=".", alpha=0.6, label=task)
    axes.plot(lams, [p.mean for p in points], marker="o", color="black", linewidth=2.2, label="mean")
    axes.axvline(chosen.lam, color="black", linestyle=":", linewidth=1)
    axes.set_xlabel("λ")
    axes.set_ylabel(f"score on {split} (0–100)")
    axes.set_title(title)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_sweep(
    recipe_path: Path,
    lambdas: Sequence[float],
    out_dir: Path,
    evaluate: Evaluator,
    *,
    split: str,
    keep_models: bool = False,
    mergekit_args: Sequence[str] = (),
) -> SweepPoint:
    text = recipe_path.read_text()
    recipe = yaml.safe_load(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    points: List[SweepPoint] = []
    for lam in lambdas:
        work = out_dir / f"lambda_{lam:g}"
        work.mkdir(parents=True, exist_ok=True)
        lam_recipe = work / "recipe.yml"
        lam_recipe.write_text(yaml.safe_dump(recipe_with_lambda(recipe, lam), sort_keys=False))
        merged = work / "model"
        run_stock_mergekit_yaml(lam_recipe, merged, *mergekit_args)
        results = work / f"results_{split}.json"
        points.append(SweepPoint(lam, evaluate(merged, results), results))
        click.echo(f"λ={lam:g}: mean {points[-1].mean:.2f} on {split}")
    chosen = best_point(points)
    for point in points:
        if point is not chosen and not keep_models:
            shutil.rmtree(out_dir / f"lambda_{point.lam:g}" / "model", ignore_errors=True)
    note = f"# λ = {chosen.lam:g} chosen by `mergekit-mllm sweep` on the {split} split (mean {chosen.mean:.2f})"
    chosen_text = "\n".join(header_comments(text) + [note]) + "\n"
    chosen_text += yaml.safe_dump(recipe_with_lambda(recipe, chosen.lam), sort_keys=False)
    (out_dir / "chosen.yml").write_text(chosen_text)
    write_table(points, chosen, split, out_dir / "sweep.md")
    write_plot(points, chosen, split, f"{recipe.get('merge_method')}: λ sweep", out_dir / "sweep.png")
    (out_dir / "sweep.json").write_text(json.dumps({
        "recipe": str(recipe_path), "split": split, "chosen_lambda": chosen.lam,
        "points": [{"lambda": p.lam, "scores": p.scores, "mean": p.mean, "results": str(p.results_path)}
                   for p in points],
    }, indent=2) + "\n")
    return chosen


def parse_lambdas(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise click.BadParameter("no λ values given")
    return values


@click.command("sweep")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--lambda", "lambdas", default=",".join(f"{v:g}" for v in PAPER_GRID), show_default=True,
              help="Comma-separated λ grid (the paper's by default).")
@click.option("--tasks", default="synth", show_default=True, help="eval_suite tasks (names or 'synth').")
@click.option("--split", default="val", show_default=True, help="Selection split; never 'test'.")
@click.option("--limit", type=int, default=None, help="Evaluate at most N items per task.")
@click.option("--device", default=None, help="Evaluation device (cpu, cuda).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: sweep-<recipe name>).")
@click.option("--keep-models", is_flag=True, help="Keep every merged model, not only the chosen one.")
@click.option("--trust-remote-code", is_flag=True, help="Passed to mergekit-yaml (InternVL2.5).")
def sweep_command(recipe, lambdas, tasks, split, limit, device, out_dir, keep_models, trust_remote_code):
    """Merge RECIPE for each λ, evaluate on a validation split and keep the best."""
    if split == "test":
        raise click.UsageError("λ must be chosen on a validation split, never on the test split (use --split val)")
    grid = parse_lambdas(lambdas)
    out_dir = out_dir or Path(f"sweep-{recipe.stem}")
    evaluate = eval_suite_evaluator(tasks, split, limit, device)
    chosen = run_sweep(recipe, grid, out_dir, evaluate, split=split, keep_models=keep_models,
                       mergekit_args=["--trust-remote-code"] if trust_remote_code else [])
    click.echo(f"chosen λ = {chosen.lam:g} (mean {chosen.mean:.2f} on {split})")
    click.echo(f"chosen recipe: {out_dir / 'chosen.yml'}")
    click.echo(f"sweep table:   {out_dir / 'sweep.md'}")
    click.echo(f"sweep plot:    {out_dir / 'sweep.png'}")
    click.echo(f"chosen model:  {out_dir / f'lambda_{chosen.lam:g}' / 'model'}")
