"""Plan a push offline, then upload it with ``huggingface_hub``.

:func:`plan_push` reads the output folder and the results, builds the card
and the plot, and decides the file list; it needs no token and no network
(``--dry-run`` stops there). :func:`upload_plan` sends the plan as one
commit: ``create_repo`` → ``create_branch`` → ``create_commit`` (the client
chooses regular, LFS or Xet uploads per file). The generated card replaces
the output's README.md *in the commit only*: nothing is ever written into
the output folder, so a failed upload leaves it exactly as it was.

The token comes from the environment (``HF_TOKEN``, or the variable named by
``token_env``) or the huggingface_hub login; it is passed to ``HfApi`` only,
and every message that leaves this module goes through :func:`redact`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from mergekit_mllm.hub.card import PLOT_NAME, LicenseInfo, build_card, license_from_card, local_base_license
from mergekit_mllm.hub.errors import MissingTokenError, PushError, RepoExistsError, UploadError
from mergekit_mllm.hub.output import CARD_NAME, WEIGHT_SUFFIXES, MergedOutput, read_output
from mergekit_mllm.hub.plot import PNG_MAGIC, scores_bar_chart
from mergekit_mllm.hub.results import EvalSet, load_results, match_results

DEFAULT_TOKEN_ENV = "HF_TOKEN"
DEFAULT_BRANCH = "main"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Text files scanned for an accidentally pasted token before anything is sent.
_SCAN_LIMIT = 64 * 1024 * 1024

Echo = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def redact(text: str, token: Optional[str]) -> str:
    """``text`` with every occurrence of the token replaced (defence in depth)."""
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return text


# ---------------------------------------------------------------------------
# The plan (offline)


@dataclass(frozen=True)
class UploadItem:
    path_in_repo: str
    size: int
    source: Union[Path, bytes]
    origin: str  # where it comes from, for the dry-run listing


@dataclass(frozen=True)
class PushPlan:
    output: MergedOutput
    evalset: EvalSet
    repo_id: str
    license: Optional[LicenseInfo]
    plot: Optional[bytes]
    plot_origin: str
    card: object  # huggingface_hub.ModelCard

    @property
    def model_name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    @property
    def card_bytes(self) -> bytes:
        return str(self.card).encode("utf-8")

    @property
    def items(self) -> Tuple[UploadItem, ...]:
        items = [UploadItem(f.path_in_repo, f.size, f.local_path, "output") for f in self.output.files]
        replaced = (self.output.path / CARD_NAME).is_file()
        items.append(UploadItem(CARD_NAME, len(self.card_bytes), self.card_bytes,
                                "generated card" + (" (replaces the local README.md in the upload)" if replaced else "")))
        if self.plot is not None:
            items.append(UploadItem(PLOT_NAME, len(self.plot), self.plot, self.plot_origin))
        return tuple(sorted(items, key=lambda item: item.path_in_repo))

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.items)

    def with_license(self, license: LicenseInfo) -> "PushPlan":
        card = build_card(self.output, self.evalset, model_name=self.model_name, license=license,
                          plot_name=PLOT_NAME if self.plot is not None else None)
        return dataclasses.replace(self, license=license, card=card)


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"--repo {repo_id!r} is not a valid Hub repository id: {exc}") from exc
    if repo_id.count("/") != 1:
        raise PushError(f"--repo must be OWNER/NAME (got {repo_id!r})")
    return repo_id


_BRANCH = re.compile(r"^(?!/|-|.*(\.\.|//|@\{|\.lock$|/$))[^\s~^:?*\[\\]+$")


def check_revision(revision: Optional[str]) -> Optional[str]:
    """A branch name to commit to (created from main when missing)."""
    if revision is None:
        return None
    if re.fullmatch(r"[0-9a-f]{40}", revision) or revision.startswith("refs/"):
        raise PushError(f"--revision must be a branch name, not a commit or a ref ({revision!r})")
    if not _BRANCH.match(revision):
        raise PushError(f"--revision {revision!r} is not a valid branch name")
    return revision


def _plot_bytes(plot: Union[None, bool, Path], output: MergedOutput, evalset: EvalSet, title: str) -> Tuple[Optional[bytes], str]:
    if plot is False:
        return None, ""
    if plot not in (None, True):
        path = Path(plot).expanduser()
        if not path.is_file():
            raise PushError(f"plot image {path} does not exist")
        data = path.read_bytes()
        if not data.startswith(PNG_MAGIC):
            raise PushError(f"plot image {path} is not a PNG file")
        return data, f"plot ({path})"
    if evalset.empty:
        return None, ""
    base_label = output.base.label if output.base else "base"
    return scores_bar_chart(evalset, base_label=base_label, title=title), "generated plot"


def plan_push(
    out: Path,
    repo_id: str,
    *,
    results: Sequence[Path] = (),
    plot: Union[None, bool, Path] = None,
    license: Optional[str] = None,
) -> PushPlan:
    """Everything a push sends, decided without a token or network access.

    ``plot``: None/True = generate a bar chart when results are given, False = no
    plot, a path = that PNG. ``license`` overrides the one found in the base's card.
    """
    check_repo_id(repo_id)
    output = read_output(Path(out))
    evalset = match_results([load_results(Path(p)) for p in results], output)
    found = LicenseInfo(license, source="given") if license else local_base_license(output)
    model_name = repo_id.split("/", 1)[1]
    plot_data, plot_origin = _plot_bytes(plot, output, evalset, title=model_name)
    card = build_card(output, evalset, model_name=model_name, license=found,
                      plot_name=PLOT_NAME if plot_data is not None else None)
    return PushPlan(output, evalset, repo_id, found, plot_data, plot_origin, card)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def describe_plan(plan: PushPlan, *, revision: Optional[str], private: bool, token_env: str = DEFAULT_TOKEN_ENV) -> str:
    """The dry-run report: target, files with sizes, notes, the card."""
    token_found = token_available(token_env)
    lines = [
        f"Dry run: nothing was sent. A push would commit to {plan.repo_id} "
        f"(branch {revision or DEFAULT_BRANCH}, {'private' if private else 'public'} if created).",
        f"Token: {'found' if token_found else 'NOT found'} ({token_source_hint(token_env)}).",
        f"Files ({len(plan.items)}, {human_size(plan.total_bytes)} in total):",
    ]
    width = max(len(human_size(item.size)) for item in plan.items)
    for item in plan.items:
        origin = "" if item.origin == "output" else f"  [{item.origin}]"
        lines.append(f"  {human_size(item.size):>{width}}  {item.path_in_repo}{origin}")
    if plan.license:
        lines.append(f"License: {plan.license.license} (from {plan.license.source}).")
    elif plan.output.base is not None and plan.output.base.hub_id:
        lines.append(f"License: not known locally; a real push reads it from {plan.output.base.hub_id}'s card on the Hub.")
    else:
        lines.append("License: unknown (no local base card declares one; pass --license).")
    for note in plan.evalset.notes:
        lines.append(f"Note: {note}")
    lines += ["", f"----- {CARD_NAME} -----", str(plan.card)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Token


def token_source_hint(token_env: str) -> str:
    if token_env == DEFAULT_TOKEN_ENV:
        return "HF_TOKEN or `hf auth login`"
    return f"environment variable {token_env}"


def _lookup_token(token_env: str) -> Optional[str]:
    value = os.environ.get(token_env, "").strip()
    if value:
        return value
    if token_env == DEFAULT_TOKEN_ENV:
        # huggingface_hub's own order: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, the saved login
        from huggingface_hub import get_token

        return get_token()
    return None  # an explicitly named variable never falls back to another identity


def token_available(token_env: str = DEFAULT_TOKEN_ENV) -> bool:
    """Whether a push would find a token; never refreshes or exchanges one (no network)."""
    if os.environ.get(token_env, "").strip():
        return True
    if token_env != DEFAULT_TOKEN_ENV:
        return False
    from huggingface_hub import constants

    return bool(os.environ.get("HUGGING_FACE_HUB_TOKEN", "").strip()) or Path(constants.HF_TOKEN_PATH).is_file()


def missing_token_error(token_env: str = DEFAULT_TOKEN_ENV) -> MissingTokenError:
    if token_env == DEFAULT_TOKEN_ENV:
        return MissingTokenError(
            "no Hugging Face token found: set HF_TOKEN to a token with write access or log in with `hf auth login`"
        )
    return MissingTokenError(f"no Hugging Face token found: environment variable {token_env} is not set")


def resolve_token(token_env: str = DEFAULT_TOKEN_ENV) -> str:
    token = _lookup_token(token_env)
    if token is None:
        raise missing_token_error(token_env)
    return token


def _refuse_token_in_upload(plan: PushPlan, token: str) -> None:
    """Never publish a token someone pasted into a recipe, config or card."""
    needle = token.encode()
    # the output's own files first: the card only quotes them (the recipe)
    for item in sorted(plan.items, key=lambda item: isinstance(item.source, bytes)):
        if isinstance(item.source, bytes):
            data = item.source
        elif item.path_in_repo.endswith(WEIGHT_SUFFIXES) or item.size > _SCAN_LIMIT:
            continue
        else:
            data = item.source.read_bytes()
        if needle in data:
            raise UploadError(
                f"{item.path_in_repo} contains your Hugging Face token: refusing to upload it. "
                f"Remove the token from {item.source if isinstance(item.source, Path) else 'the recipe or results'} "
                "and revoke it if it was shared."
            )


# ---------------------------------------------------------------------------
# Upload


@dataclass(frozen=True)
class RetryPolicy:
    """Transient failures (connection errors, 408/429/5xx) of each step are retried."""

    attempts: int = 4
    base_delay: float = 2.0
    max_delay: float = 30.0

    def delays(self) -> Iterator[float]:
        delay = self.base_delay
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(self.max_delay, delay * 2)


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    url: str
    commit_oid: str
    commit_url: str
    files: int
    bytes: int
    created_repo: bool


def _transport_errors() -> Tuple[type, ...]:
    """Connection-level exception types of the HTTP client huggingface_hub uses."""
    types: List[type] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):  # whichever huggingface_hub has imported
        error = getattr(sys.modules.get(module_name), "TransportError", None)
        if error is not None:
            types.append(error)
    return tuple(types)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> Optional[int]:
    for cause in _causes(exc):
        response = getattr(cause, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _is_transient(exc: BaseException) -> bool:
    transport = _transport_errors()
    return _status(exc) in TRANSIENT_STATUS or any(isinstance(c, transport) for c in _causes(exc))


class _Steps:
    """Runs each network step with retries and turns failures into clear errors."""

    def __init__(self, *, plan: PushPlan, token: str, endpoint: str, retry: RetryPolicy, echo: Echo, token_env: str):
        self.plan, self.token, self.endpoint = plan, token, endpoint
        self.retry, self.echo, self.token_env = retry, echo, token_env

    def run(self, step: str, action: Callable[[], object]):
        delays = self.retry.delays()
        attempt = 1
        while True:
            try:
                return action()
            except PushError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated below, never swallowed
                delay = next(delays, None) if _is_transient(exc) else None
                if delay is None:
                    raise self.translate(step, exc, attempt) from exc
                self.echo(redact(
                    f"{step}: transient error ({_short(exc)}); retry {attempt}/{self.retry.attempts - 1} "
                    f"in {delay:g}s", self.token))
                time.sleep(delay)
                attempt += 1

    def translate(self, step: str, exc: BaseException, attempts: int) -> UploadError:
        status = _status(exc)
        owner = self.plan.repo_id.split("/")[0]
        if status == 401:
            reason = (f"the Hub rejected the token (401 Unauthorized): set a valid write token in "
                      f"{token_source_hint(self.token_env)}")
        elif status == 403:
            reason = f"the token may not write to {owner!r} (403 Forbidden): use a token with write access there"
        elif _is_transient(exc):
            reason = f"the Hub at {self.endpoint} still failed after {attempts} attempt(s): {_short(exc)}"
        else:
            reason = _short(exc)
        return UploadError(redact(
            f"could not {step} for {self.plan.repo_id}: {reason}\n"
            f"Nothing was written to {self.plan.output.path}; fix the cause and push again "
            f"(with --exist-ok if the repository was created).", self.token))


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: " + " ".join(lines[:4])


def _hub_license(api, repo_id: str, revision: Optional[str] = None) -> Optional[LicenseInfo]:
    """The license declared by a card on the Hub (best effort, one try)."""
    try:
        with tempfile.TemporaryDirectory() as cache:
            card_path = api.hf_hub_download(repo_id=repo_id, filename=CARD_NAME, revision=revision, cache_dir=cache)
            return license_from_card(Path(card_path), f"{repo_id}'s card on the Hub")
    except Exception:  # missing, gated or unreachable: the card just has no license
        return None


def _operations(plan: PushPlan):
    from huggingface_hub import CommitOperationAdd

    # Fresh objects per attempt: the client marks operations as committed.
    return [
        CommitOperationAdd(
            path_in_repo=item.path_in_repo,
            path_or_fileobj=str(item.source) if isinstance(item.source, Path) else item.source,
        )
        for item in plan.items
    ]


def default_commit_message(plan: PushPlan) -> str:
    from mergekit_mllm import __version__

    return f"Upload {plan.output.method_name} merge with mergekit-mllm {__version__}"


def upload_plan(
    plan: PushPlan,
    *,
    token: str,
    endpoint: Optional[str] = None,
    private: bool = False,
    revision: Optional[str] = None,
    exist_ok: bool = False,
    commit_message: Optional[str] = None,
    retry: RetryPolicy = RetryPolicy(),
    echo: Echo = _stderr,
    token_env: str = DEFAULT_TOKEN_ENV,
) -> PushResult:
    from huggingface_hub import HfApi

    from mergekit_mllm import __version__

    check_revision(revision)
    _refuse_token_in_upload(plan, token)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="mergekit-mllm", library_version=__version__)
    steps = _Steps(plan=plan, token=token, endpoint=api.endpoint, retry=retry, echo=echo, token_env=token_env)
    repo_id = plan.repo_id

    # exists-check first, so a retried create can never be mistaken for "already there"
    exists = steps.run("check the repository", lambda: api.repo_exists(repo_id))
    if exists and not exist_ok:
        raise RepoExistsError(
            f"{repo_id} already exists on {api.endpoint}: pass --exist-ok (hub: exist_ok: true) to add a commit "
            f"to it, or choose another --repo. Nothing was uploaded and {plan.output.path} is unchanged."
        )
    if not exists:
        echo(f"Creating {'private' if private else 'public'} repository {repo_id}")
        steps.run("create the repository", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    elif private:
        info = steps.run("read the repository", lambda: api.model_info(repo_id))
        if not info.private:
            raise UploadError(
                f"{repo_id} exists and is public, but a private push was requested: refusing to publish. "
                f"Make the repository private first, or drop --private. {plan.output.path} is unchanged."
            )
    if revision and revision != DEFAULT_BRANCH:
        steps.run(f"create branch {revision!r}",
                  lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))

    if plan.license is None:
        # the base's card on the Hub, else the license this repo's card already declares
        sources = [(plan.output.base.hub_id, None)] if plan.output.base is not None and plan.output.base.hub_id else []
        sources += [(repo_id, revision)] if exists else []
        found = next(filter(None, (_hub_license(api, *source) for source in sources)), None)
        if found is not None:
            plan = plan.with_license(found)
            _refuse_token_in_upload(plan, token)

    echo(f"Uploading {len(plan.items)} files ({human_size(plan.total_bytes)}) to {repo_id}@{revision or DEFAULT_BRANCH}")
    message = commit_message or default_commit_message(plan)
    info = steps.run("upload the files", lambda: api.create_commit(
        repo_id, _operations(plan), commit_message=message, revision=revision,
        commit_description=f"{len(plan.items)} files, {human_size(plan.total_bytes)}; card generated by mergekit-mllm.",
    ))
    branch = revision or DEFAULT_BRANCH
    return PushResult(
        repo_id=repo_id,
        revision=branch,
        url=f"{api.endpoint}/{repo_id}/tree/{branch}",
        commit_oid=info.oid,
        commit_url=info.commit_url,
        files=len(plan.items),
        bytes=plan.total_bytes,
        created_repo=not exists,
    )


def push(
    out: Path,
    repo_id: str,
    *,
    results: Sequence[Path] = (),
    private: bool = False,
    revision: Optional[str] = None,
    exist_ok: bool = False,
    token_env: str = DEFAULT_TOKEN_ENV,
    endpoint: Optional[str] = None,
    plot: Union[None, bool, Path] = None,
    license: Optional[str] = None,
    commit_message: Optional[str] = None,
    retry: RetryPolicy = RetryPolicy(),
    echo: Echo = _stderr,
) -> PushResult:
    """Plan (offline checks first: folder, results, revision), then resolve the token and upload."""
    check_revision(revision)
    plan = plan_push(out, repo_id, results=results, plot=plot, license=license)
    token = resolve_token(token_env)
    return upload_plan(
        plan, token=token, endpoint=endpoint, private=private, revision=revision, exist_ok=exist_ok,
        commit_message=commit_message, retry=retry, echo=echo, token_env=token_env,
    )
