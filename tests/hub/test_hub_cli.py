"""``mergekit-mllm push`` as users run it: a subprocess, the environment, the test hub."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_fixtures import TOKEN, USER, files_containing, folder_state, subprocess_env
from huggingface_hub import ModelCard, snapshot_download

REPO = f"{USER}/cli-merge"


def run_push(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergekit_mllm.cli", "push", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=180)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_push_and_the_token_never_leaks(hub, vlm_output, vlm_results, tmp_path):
    env = subprocess_env(hub.endpoint, tmp_path / "hf_home")
    results = [a for name in ("merged", "base", "expert") for a in ("--results", vlm_results[name])]
    before = folder_state(vlm_output)
    runs = []

    def push(*args, env=env, debug=False):
        run = run_push(vlm_output, "--repo", REPO, *args, env={**env, "HF_DEBUG": "1"} if debug else env)
        runs.append(run)
        return run

    created = push(*results, "--license", "apache-2.0", debug=True)  # debug: the client logs every request
    assert created.returncode == 0, created.stderr
    assert f"/{REPO}/tree/main" in created.stdout and "Creating public repository" in created.stderr

    again = push(*results)
    assert again.returncode == 1 and "already exists" in again.stderr and "--exist-ok" in again.stderr

    branch = push("--results", vlm_results["merged"], "--exist-ok", "--revision", "v2")
    assert branch.returncode == 0, branch.stderr

    revoked = push("--exist-ok", env={**env, "HF_TOKEN": TOKEN + "x"})
    assert revoked.returncode == 1 and "401 Unauthorized" in revoked.stderr

    no_token = push("--exist-ok", env={k: v for k, v in env.items() if k != "HF_TOKEN"})
    assert no_token.returncode == 1 and "no Hugging Face token found" in no_token.stderr

    # the token is nowhere: command output (incl. debug logs), output folder, results, card, repo files
    for run in runs:
        assert TOKEN not in run.stdout + run.stderr
    assert any("Request" in run.stderr for run in runs)  # the debug run did log requests
    assert folder_state(vlm_output) == before
    assert not files_containing(vlm_output, TOKEN) and not files_containing(tmp_path, TOKEN)
    for revision in ("main", "v2"):
        snapshot = Path(snapshot_download(REPO, revision=revision, endpoint=hub.endpoint, token=TOKEN,
                                          cache_dir=tmp_path / f"dl-{revision}"))
        assert not files_containing(snapshot, TOKEN)
        card = ModelCard.load(snapshot / "README.md")
        assert card.data.pipeline_tag == "image-text-to-text" and card.data.license == "apache-2.0"
    stored = [e.content or b"" for r in hub.state.repos.values() for c in r.commits.values() for e in c.tree.values()]
    assert not any(TOKEN.encode() in blob for blob in stored + list(hub.state.lfs.values()))


def test_dry_run_prints_the_plan_and_sends_nothing(hub, vlm_output, vlm_results, tmp_path):
    results = ["--results", vlm_results["merged"], vlm_results["base"]]  # the issue's `--results a.json b.json` form
    offline = subprocess_env(f"http://127.0.0.1:{closed_port()}", tmp_path / "home")
    dry = run_push(vlm_output, "--repo", REPO, *results, "--dry-run", env=offline)
    assert dry.returncode == 0, dry.stderr
    text = dry.stdout
    assert "Dry run: nothing was sent" in text and "Token: found" in text and TOKEN not in text + dry.stderr
    for shard in vlm_output.glob("*.safetensors"):
        size = shard.stat().st_size
        assert shard.name in text
        assert f"{size / 1024:.1f} KiB  {shard.name}" in text or f"{size} B  {shard.name}" in text
    assert "README.md  [generated card" in text and "eval_scores.png  [generated plot]" in text
    card_text = text.split("----- README.md -----\n", 1)[1]
    assert ModelCard(card_text).data.eval_results[0].dataset_name == "synth_chart"
    assert "Base (Qwen/Qwen2-VL-7B)" in card_text  # the second results file was taken too

    # against a live hub: not a single request
    live = run_push(vlm_output, "--repo", REPO, *results, "--dry-run", env=subprocess_env(hub.endpoint, tmp_path / "home"))
    assert live.returncode == 0 and hub.requests == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "--repo", REPO], "does not exist"),
        (["{out}", "--repo", "no-owner"], "must be OWNER/NAME"),
        (["{out}", "--repo", REPO, "--plot", "x.png", "--no-plot"], "--plot and --no-plot exclude each other"),
        (["{out}", "--repo", REPO, "--revision", "refs/pr/1"], "must be a branch name"),
        (["{out}", "{out}", "--repo", REPO], "give exactly one output folder OUT"),
        (["{out}", "--repo", REPO, "--results", "{missing}.json"], "missing.json does not exist"),
    ],
)
def test_cli_errors_are_one_clear_line(hub, vlm_output, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "missing", out=vlm_output) for a in args]
    run = run_push(*args, env=subprocess_env(hub.endpoint, tmp_path / "home"))
    assert run.returncode != 0 and message in run.stderr
    assert "Traceback" not in run.stderr and hub.requests == []
