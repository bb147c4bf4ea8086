"""``mergekit-mllm main``: the main job on the embedded default.

Builds a tiny seeded Qwen2-VL base and experts offline, writes a recipe and
merges them with ``optmerge`` through the stock ``mergekit-yaml`` command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click


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


def tiny_example(root: Path) -> Path:
    from mergekit_mllm.testing import recipe_for, write_recipe
    from mergekit_mllm.testing.vlm import build_vlm_family

    family = build_vlm_family("qwen2_vl", root / "models", experts=3)
    recipe = recipe_for(
        "optmerge", family["base"], family["experts"], {"variant": "lora", "preset": "optmerge_paper"}
    )
    return write_recipe(root / "optmerge.yml", recipe)


@click.command("main")
@click.option("--out", "out_dir", default="outputs/main", show_default=True, type=click.Path(path_type=Path))
def main_command(out_dir: Path):
    """Run the main job on the embedded default and print where the outputs are."""
    out_dir = out_dir.absolute()
    recipe = tiny_example(out_dir)
    merged = out_dir / "merged-optmerge"
    run_stock_mergekit_yaml(recipe, merged)
    click.echo(f"recipe:       {recipe}")
    click.echo(f"merged model: {merged}")
    click.echo(f"merge report: {merged / 'mergekit_mllm_report.json'}")
