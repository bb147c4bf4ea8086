"""``mergekit-mllm push``: upload a merge output folder with an evaluation card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click


@click.command("push")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="OUT [RESULTS.json]...")
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME", help="Hub repository to push to.")
@click.option("--private", is_flag=True, help="Create the repository as private (refused if it exists and is public).")
@click.option(
    "--results", "results", multiple=True, type=click.Path(path_type=Path), metavar="RESULTS.json",
    help="eval_suite results file; repeat for the merged model, its base and experts.",
)
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created from main). Default: main.")
@click.option("--dry-run", is_flag=True, help="Print the file list, sizes and the card; send nothing.")
@click.option("--exist-ok", is_flag=True, help="Allow pushing a new commit to an existing repository.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, metavar="PNG",
              help="Image for the card (default: a bar chart generated from the results).")
@click.option("--no-plot", is_flag=True, help="Do not add a plot to the card.")
@click.option("--license", "license_id", default=None, help="License id (default: the base model card's license).")
@click.option("--token-env", default="HF_TOKEN", show_default=True,
              help="Environment variable holding the token (HF_TOKEN also falls back to `hf auth login`).")
@click.option("--commit-message", default=None, help="Commit title (default names the method and plugin version).")
@click.option("--endpoint", default=None, envvar="HF_ENDPOINT", metavar="URL",
              help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co).")
def push_command(
    paths: Tuple[Path, ...],
    repo_id: str,
    private: bool,
    results: Tuple[Path, ...],
    revision: Optional[str],
    dry_run: bool,
    exist_ok: bool,
    plot: Optional[Path],
    no_plot: bool,
    license_id: Optional[str],
    token_env: str,
    commit_message: Optional[str],
    endpoint: Optional[str],
):
    """Push the merge output folder OUT to the Hub with a card holding its scores.

    The card (README.md) is generated from OUT/mergekit_mllm_report.json (or
    mergekit_config.yml) and the eval_suite results, and replaces OUT's
    README.md in the upload only: OUT itself is never modified. Results files
    are given with --results, which may be followed by more of them
    (`--results merged.json base.json`): every *.json argument is a results file.
    """
    from mergekit_mllm.hub.errors import PushError
    from mergekit_mllm.hub.push import (
        check_revision, describe_plan, human_size, plan_push, redact, resolve_token, upload_plan,
    )

    if plot is not None and no_plot:
        raise click.UsageError("--plot and --no-plot exclude each other")
    # `--results a.json b.json`: click binds a.json to the option and leaves b.json positional
    folders = [p for p in paths if p.suffix.lower() != ".json"]
    results = tuple(results) + tuple(p for p in paths if p.suffix.lower() == ".json")
    if len(folders) != 1:
        raise click.UsageError(
            f"give exactly one output folder OUT (got {', '.join(map(str, folders)) or 'none'}); "
            "results files must end in .json"
        )
    out = folders[0]
    plot_choice = False if no_plot else plot
    token = None
    try:
        check_revision(revision)
        plan = plan_push(out, repo_id, results=results, plot=plot_choice, license=license_id)
        if dry_run:
            click.echo(describe_plan(plan, revision=revision, private=private, token_env=token_env))
            return
        token = resolve_token(token_env)
        result = upload_plan(
            plan, token=token, endpoint=endpoint, private=private, revision=revision, exist_ok=exist_ok,
            commit_message=commit_message, token_env=token_env, echo=lambda m: click.echo(m, err=True),
        )
    except PushError as exc:
        raise click.ClickException(redact(str(exc), token)) from None
    click.echo(f"Pushed {result.files} files ({human_size(result.bytes)}) to {result.url}")
    click.echo(f"Commit: {result.commit_url}")
