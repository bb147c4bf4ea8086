"""The recipe's ``hub:`` section: push automatically after ``mergekit-yaml``.

::

    hub:
      repo: my-org/qwen2-vl-7b-optmerge   # required, OWNER/NAME
      private: true                       # default false (applies when the repo is created)
      revision: v2                        # branch to commit to (created from main); default main
      exist_ok: false                     # allow pushing to an existing repository
      results: [base.json, ocr.json]      # eval_suite results files (paths relative to the cwd)
      token_env: HF_TOKEN                 # environment variable holding the token
      license: apache-2.0                 # overrides the license read from the base's card
      plot: true                          # true (bar chart when results exist) / false / path to a PNG
      commit_message: "OptMerge, λ=1.0"
      evaluate:                           # score the merged model with eval_suite before pushing
        tasks: synth                      # required: synth, paper or comma-separated task names
        limit: 200                        # optional: first N items per task
        split: test                       # optional (synthetic tasks): val or test
        device: cpu                       # optional; batch_size, dtype also accepted

The merge wrapper calls :func:`validate_hub_section` *before* merging, so a
bad section (unknown key, wrong type, missing results file, no token) fails
before any work, and :func:`push_after_merge` after a successful merge.
A token is never accepted in the recipe: it would end up in
``mergekit_config.yml`` and on the Hub.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from mergekit_mllm.hub.errors import HubSectionError, PushError
from mergekit_mllm.hub.push import (
    DEFAULT_TOKEN_ENV, PushResult, check_repo_id, check_revision, missing_token_error, push, token_available,
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What a pasted secret looks like (Hub user/org/OAuth tokens), so the
# error can say "that is a token" without ever echoing it.
_LOOKS_LIKE_TOKEN = re.compile(r"^(hf_|hf_oauth_|api_org_)[A-Za-z0-9_]{16,}$")


@dataclass(frozen=True)
class HubSection:
    repo: str
    private: bool = False
    revision: Optional[str] = None
    exist_ok: bool = False
    results: Tuple[str, ...] = ()
    token_env: str = DEFAULT_TOKEN_ENV
    license: Optional[str] = None
    plot: Union[bool, str] = True
    commit_message: Optional[str] = None
    evaluate: Optional[Tuple[Tuple[str, Any], ...]] = None


#: ``evaluate:`` keys and the ``python -m eval_suite run`` option each becomes.
EVALUATE_KEYS = {"tasks": "--tasks", "limit": "--limit", "split": "--split", "device": "--device",
                 "batch_size": "--batch-size", "dtype": "--dtype"}

KEYS = tuple(f.name for f in fields(HubSection))


def _fail(message: str) -> None:
    raise HubSectionError(f"hub: {message}")


def _expect(section: Mapping[str, Any], key: str, types: tuple, description: str) -> None:
    value = section.get(key)
    if key in section and not isinstance(value, types):
        shown = "a value that looks like a token" if isinstance(value, str) and _LOOKS_LIKE_TOKEN.match(value) else repr(value)
        _fail(f"{key} must be {description} (got {shown})")


def parse_hub_section(recipe: Mapping[str, Any]) -> Optional[HubSection]:
    """The validated ``hub:`` section, or None when the recipe has none. Offline."""
    if not isinstance(recipe, Mapping):
        raise HubSectionError("the recipe must be a mapping")
    if recipe.get("hub") is None:
        return None
    section = recipe["hub"]
    if not isinstance(section, Mapping):
        _fail(f"must be a mapping with at least `repo` (got {type(section).__name__})")
    for key in section:
        if key in ("token", "hf_token", "api_token"):
            _fail(f"`{key}` is not allowed: never put a token in a recipe (it would be published with "
                  f"mergekit_config.yml). Export it as HF_TOKEN, or name another variable with token_env.")
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            _fail(f"unknown key `{key}`{hint}; allowed keys: {', '.join(KEYS)}")
    for key, value in section.items():
        if isinstance(value, str) and _LOOKS_LIKE_TOKEN.match(value.strip()):
            _fail(f"`{key}` holds what looks like a Hugging Face token: remove it from the recipe "
                  "(and revoke it if the recipe was shared)")
    if "repo" not in section:
        _fail("`repo: OWNER/NAME` is required")
    _expect(section, "repo", (str,), "a string OWNER/NAME")
    for key in ("private", "exist_ok"):
        _expect(section, key, (bool,), "true or false")
    for key in ("revision", "license", "commit_message"):
        _expect(section, key, (str, type(None)), "a string")
    _expect(section, "token_env", (str,), "the name of an environment variable")
    _expect(section, "plot", (bool, str), "true, false or the path of a PNG file")
    _expect(section, "results", (str, list, tuple), "a path or a list of paths")

    try:
        check_repo_id(section["repo"])
        check_revision(section.get("revision"))
    except PushError as exc:
        _fail(str(exc).replace("--repo", "repo").replace("--revision", "revision"))
    token_env = section.get("token_env", DEFAULT_TOKEN_ENV)
    if not _ENV_NAME.match(token_env):
        _fail(f"token_env must be the name of an environment variable such as HF_TOKEN (got {token_env!r})")

    results = section.get("results") or ()
    results = (results,) if isinstance(results, str) else tuple(results)
    for item in results:
        if not isinstance(item, str) or not item:
            _fail(f"results must be paths (got {item!r})")
        if not Path(item).expanduser().is_file():
            _fail(f"results file {item} does not exist")
    evaluate = _parse_evaluate(section.get("evaluate"))
    plot = section.get("plot", True)
    if isinstance(plot, str) and not Path(plot).expanduser().is_file():
        _fail(f"plot image {plot} does not exist")
    return HubSection(
        repo=section["repo"],
        private=section.get("private", False),
        revision=section.get("revision"),
        exist_ok=section.get("exist_ok", False),
        results=results,
        token_env=token_env,
        license=section.get("license"),
        plot=plot,
        commit_message=section.get("commit_message"),
        evaluate=evaluate,
    )


def _parse_evaluate(value: Any) -> Optional[Tuple[Tuple[str, Any], ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"tasks": value}
    if not isinstance(value, Mapping):
        _fail(f"evaluate must be a mapping with at least `tasks` (got {value!r})")
    for key in value:
        if key not in EVALUATE_KEYS:
            close = difflib.get_close_matches(str(key), EVALUATE_KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            _fail(f"evaluate: unknown key `{key}`{hint}; allowed keys: {', '.join(EVALUATE_KEYS)}")
    if not isinstance(value.get("tasks"), str) or not value["tasks"].strip():
        _fail("evaluate: `tasks` is required (synth, paper or comma-separated task names)")
    for key in ("limit", "batch_size"):
        if key in value and (not isinstance(value[key], int) or isinstance(value[key], bool) or value[key] < 1):
            _fail(f"evaluate: {key} must be a positive integer (got {value[key]!r})")
    if "split" in value and value["split"] not in ("val", "test"):
        _fail(f"evaluate: split must be val or test (got {value['split']!r})")
    for key in ("device", "dtype"):
        if key in value and not isinstance(value[key], str):
            _fail(f"evaluate: {key} must be a string (got {value[key]!r})")
    return tuple((key, value[key]) for key in EVALUATE_KEYS if key in value)


def evaluate_merged(out_path: Path, evaluate: Tuple[Tuple[str, Any], ...]) -> Path:
    """Run ``python -m eval_suite run`` on the merged model; returns the results file, written
    next to the output folder (``OUT.eval_results.json``) so the model folder stays as merged."""
    import subprocess

    out_path = Path(out_path).resolve()
    results = out_path.with_name(out_path.name + ".eval_results.json")
    command = [sys.executable, "-m", "eval_suite", "run", "--model", str(out_path), "--output", str(results)]
    for key, value in evaluate:
        command += [EVALUATE_KEYS[key], str(value)]
    print(f"Evaluating {out_path} before the push: {' '.join(command[1:])}", file=sys.stderr)
    completed = subprocess.run(command)
    if completed.returncode != 0 or not results.is_file():
        raise PushError(
            f"evaluating the merged model failed (exit {completed.returncode}); nothing was pushed. "
            f"Command: {' '.join(command)}"
        )
    return results


def validate_hub_section(recipe: Dict[str, Any]) -> None:
    """Raise :class:`HubSectionError` (or :class:`MissingTokenError`) before merging.

    Checks the schema, the repo id and branch name, that the results and plot
    files exist and that a token is available. No network access.
    """
    section = parse_hub_section(recipe)
    if section is not None and not token_available(section.token_env):
        raise missing_token_error(section.token_env)


def push_after_merge(out_path: Path, recipe: Dict[str, Any], *, endpoint: Optional[str] = None) -> Optional[PushResult]:
    """Push ``out_path`` as the recipe's ``hub:`` section asks; a no-op without one.

    Raises :class:`PushError` subclasses with the reason; the merged model stays
    intact in ``out_path`` and ``mergekit-mllm push`` can retry the upload.
    """
    section = parse_hub_section(recipe)
    if section is None:
        return None
    plot: Union[None, bool, Path] = Path(section.plot) if isinstance(section.plot, str) else (None if section.plot else False)
    results = [Path(p) for p in section.results]
    try:
        if section.evaluate:
            results.append(evaluate_merged(Path(out_path), section.evaluate))
        result = push(
            Path(out_path),
            section.repo,
            results=results,
            private=section.private,
            revision=section.revision,
            exist_ok=section.exist_ok,
            token_env=section.token_env,
            endpoint=endpoint,
            plot=plot,
            license=section.license,
            commit_message=section.commit_message,
        )
    except PushError as exc:
        retry = f"mergekit-mllm push {out_path} --repo {section.repo} --exist-ok"
        if section.revision:
            retry += f" --revision {section.revision}"
        retry += "".join(f" --results {p}" for p in results)
        raise type(exc)(f"{exc}\nThe merge itself succeeded; to retry only the upload: {retry}") from exc
    print(f"Pushed {out_path} to {result.url} (commit {result.commit_oid[:10]})", file=sys.stderr)
    return result
