"""``mergekit-mllm main``: the main job on the embedded default.

The offline synthetic benchmark end to end, on CPU:

1. build (or reuse from the cache) the tiny model family — a base and one
   expert per capability — with ``python -m eval_suite synth build``;
2. merge the experts with all ten methods through the stock ``mergekit-yaml``,
   using the recipes in ``recipes/synth/`` (model paths pointed at the build);
3. evaluate the base, every expert and every merge with ``eval_suite``;
4. write a leaderboard (Markdown table + PNG plot) and a model card per merge,
   and print where everything is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import click
import yaml

CAPABILITIES = ("vqa", "geometry", "chart", "ocr", "grounding")
METHODS = ("weight_average", "task_arithmetic", "ties_merging", "dare_task_arithmetic", "dare_ties_merging",
           "tsv", "iso_c", "iso_cts", "wudi", "optmerge")
SYNTH_PLACEHOLDER = "outputs/main/synth"


def stock_command(name: str) -> str:
    """A console script installed next to this interpreter (e.g. mergekit-yaml)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise click.ClickException(f"`{name}` is not installed in this environment")
    return found


def run_stock_mergekit_yaml(recipe: Path, out: Path, *extra: str) -> None:
    command = [stock_command("mergekit-yaml"), str(recipe), str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def eval_suite(*args: str) -> None:
    command = [sys.executable, "-m", "eval_suite", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def synth_recipes() -> Dict[str, str]:
    """The shipped recipes/synth/*.yml (from the source tree or the installed package)."""
    root = Path(__file__).resolve().parents[1] / "recipes" / "synth"
    if not root.is_dir():
        root = Path(str(resources.files("mergekit_mllm") / "recipes" / "synth"))
    recipes = {path.stem: path.read_text() for path in sorted(root.glob("*.yml"))}
    missing = [m for m in METHODS if m not in recipes]
    if missing:
        raise click.ClickException(f"recipes/synth lacks {', '.join(missing)}")
    return recipes


def point_recipe_at(text: str, synth_dir: Path) -> str:
    """Replace the recipe's default build location with ``synth_dir``."""
    return text.replace(SYNTH_PLACEHOLDER, str(synth_dir))


def write_card(merged: Path, results: Sequence[Path]) -> Path:
    """README.md card with eval results for a merge output (no network)."""
    from mergekit_mllm.hub.card import build_card
    from mergekit_mllm.hub.output import read_output
    from mergekit_mllm.hub.plot import scores_bar_chart
    from mergekit_mllm.hub.results import load_results, match_results

    output = read_output(merged)
    evalset = match_results([load_results(path) for path in results], output)
    (merged / "scores.png").write_bytes(scores_bar_chart(evalset, base_label="base", title=merged.name))
    card = build_card(output, evalset, model_name=merged.name, plot_name="scores.png")
    card.save(merged / "README.md")
    return merged / "README.md"


def run_main_job(out_dir: Path, *, size: str, limit: Optional[int], methods: Sequence[str]) -> Dict[str, Path]:
    started = time.time()
    synth_dir, merges_dir, results_dir = out_dir / "synth", out_dir / "merges", out_dir / "results"
    for folder in (merges_dir, results_dir):
        folder.mkdir(parents=True, exist_ok=True)
    click.echo(f"[1/4] building the synthetic model family ({size}) in {synth_dir}")
    eval_suite("synth", "build", "--size", size, "--out", str(synth_dir))

    click.echo(f"[2/4] merging with {len(methods)} methods through stock mergekit-yaml")
    recipes = synth_recipes()
    merged: Dict[str, Path] = {}
    for method in methods:
        recipe = merges_dir / f"{method}.yml"
        recipe.write_text(point_recipe_at(recipes[method], synth_dir))
        merged[method] = merges_dir / method
        run_stock_mergekit_yaml(recipe, merged[method])
        click.echo(f"      {method}")

    click.echo("[3/4] evaluating base, experts and merges on the synthetic test split")
    models = {"base": synth_dir / "base"}
    models.update({f"expert-{c}": synth_dir / "experts" / c for c in CAPABILITIES})
    models.update({f"merged-{m}": path for m, path in merged.items()})
    results: Dict[str, Path] = {}
    for name, path in models.items():
        results[name] = results_dir / f"{name}.json"
        arguments = ["run", "--model", str(path), "--tasks", "synth", "--split", "test",
                     "--output", str(results[name]), "--no-progress"]
        if limit is not None:
            arguments += ["--limit", str(limit)]
        eval_suite(*arguments)
        click.echo(f"      {name}")

    click.echo("[4/4] leaderboard and model cards")
    leaderboard = out_dir / "leaderboard"
    eval_suite("report", *map(str, results.values()), "--out", str(leaderboard))
    comparison = [results["base"]] + [results[f"expert-{c}"] for c in CAPABILITIES]
    cards = {m: write_card(merged[m], [results[f"merged-{m}"]] + comparison) for m in methods}
    (out_dir / "main_job.json").write_text(json.dumps({
        "seconds": round(time.time() - started, 1), "size": size, "limit": limit,
        "models": {k: str(v) for k, v in models.items()}, "results": {k: str(v) for k, v in results.items()},
        "leaderboard": str(leaderboard), "cards": {k: str(v) for k, v in cards.items()},
    }, indent=2) + "\n")
    return {"synth": synth_dir, "merges": merges_dir, "results": results_dir, "leaderboard": leaderboard}


@click.command("main")
@click.option("--out", "out_dir", default="outputs/main", show_default=True, type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["ci", "full", "smoke"]), default="full", show_default=True,
              help="Size of the synthetic model family (smoke: seconds, untrained quality; for tests).")
@click.option("--limit", type=int, default=None, help="Evaluate at most N items per task (default: all).")
@click.option("--methods", default=",".join(METHODS), show_default=True, help="Comma-separated subset of methods.")
def main_command(out_dir: Path, size: str, limit: Optional[int], methods: str):
    """The offline synthetic benchmark: build, merge with all ten methods, evaluate, report."""
    chosen: List[str] = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    paths = run_main_job(out_dir.absolute(), size=size, limit=limit, methods=chosen)
    click.echo("")
    click.echo(f"leaderboard:   {paths['leaderboard']}")
    click.echo(f"merged models: {paths['merges']}  (each with README.md card and scores.png)")
    click.echo(f"results:       {paths['results']}")
    click.echo(f"model family:  {paths['synth']}")
