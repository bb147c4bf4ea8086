"""Pushes for real: the huggingface_hub client against the local test hub."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from hub_fixtures import BASE_ID, OTHER_TOKEN, TOKEN, USER, files_containing, folder_state, write_results
from huggingface_hub import HfApi, ModelCard, snapshot_download

from mergekit_mllm.hub.card import PLOT_NAME
from mergekit_mllm.hub.errors import MissingTokenError, OutputFolderError, RepoExistsError, ResultsError, UploadError
from mergekit_mllm.hub.push import plan_push, push

REPO = f"{USER}/qwen2-vl-optmerge"

# httpx2 (inside huggingface_hub) deprecates the `data=` form the client uses for LFS parts
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:httpx2")


def _all_results(vlm_results):
    return [vlm_results["merged"], vlm_results["base"], vlm_results["expert"]]


def _download(hub, tmp_path, revision="main", name="dl") -> Path:
    return Path(snapshot_download(REPO, revision=revision, endpoint=hub.endpoint, token=TOKEN,
                                  cache_dir=tmp_path / name))


def _assert_identical_to_output(downloaded: Path, out: Path, plan) -> None:
    """Every output file byte-identical; README.md is the card, plus the plot."""
    for item in plan.items:
        got = (downloaded / item.path_in_repo).read_bytes()
        expected = item.source if isinstance(item.source, bytes) else (out / item.path_in_repo).read_bytes()
        assert got == expected, item.path_in_repo
    assert {p.name for p in downloaded.iterdir()} == {i.path_in_repo for i in plan.items} | {".gitattributes"}


def test_push_sharded_model_and_download_it_back(hub_env, vlm_output, vlm_results, tmp_path, fast_retry):
    hub = hub_env
    before = folder_state(vlm_output)
    result = push(vlm_output, REPO, results=_all_results(vlm_results), endpoint=hub.endpoint, retry=fast_retry,
                  license="apache-2.0", echo=lambda m: None)
    assert result.created_repo and result.revision == "main"
    assert folder_state(vlm_output) == before  # the output folder is only read

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    shards = sorted(p.name for p in vlm_output.glob("*.safetensors"))
    assert len(shards) > 5
    assert set(shards) <= set(api.list_repo_files(REPO))
    # the safetensors went through LFS, the big ones in multipart chunks
    paths = [r["path"] for r in hub.requests]
    assert any(p.startswith("/_lfs/part/") for p in paths) and any(p.startswith("/_lfs/object/") for p in paths)
    assert sum(p.endswith(".git/info/lfs/objects/batch") for p in paths) == 1

    plan = plan_push(vlm_output, REPO, results=_all_results(vlm_results), license="apache-2.0")
    downloaded = _download(hub, tmp_path)
    _assert_identical_to_output(downloaded, vlm_output, plan)
    card = ModelCard.load(downloaded / "README.md")
    assert card.data.eval_results == plan.card.data.eval_results
    assert (downloaded / PLOT_NAME).read_bytes() == plan.plot

    info = api.model_info(REPO)
    assert info.pipeline_tag == "image-text-to-text" and "mergekit-mllm" in info.tags
    assert info.card_data.base_model[0] == BASE_ID and info.private is False


def test_update_card_then_push_a_new_branch(use_hub_endpoint, vlm_output, vlm_results, tmp_path, fast_retry):
    hub = use_hub_endpoint
    quiet = dict(endpoint=hub.endpoint, retry=fast_retry, echo=lambda m: None)
    first = push(vlm_output, REPO, results=[vlm_results["merged"]], **quiet)

    # 1. new scores -> only the card and plot change; no weight is uploaded again
    rescored = write_results(tmp_path / "rescored.json", str(vlm_output), vlm_output.name,
                             {"synth_chart": 73.0, "synth_ocr": 58.5})
    n_before = len(hub.requests)
    second = push(vlm_output, REPO, results=[rescored], exist_ok=True, **quiet)
    new_requests = [r["path"] for r in hub.requests[n_before:]]
    assert second.commit_oid != first.commit_oid
    shard_oids = {hashlib.sha256(p.read_bytes()).hexdigest() for p in vlm_output.glob("*.safetensors")}
    uploaded = {p.split("/")[3] for p in new_requests if p.startswith("/_lfs/")}
    assert uploaded and not uploaded & shard_oids  # the new plot went up, no shard did
    main_card = ModelCard.load(_download(hub, tmp_path, name="main") / "README.md")
    assert {r.dataset_name: r.metric_value for r in main_card.data.eval_results} == {"synth_chart": 73.0, "synth_ocr": 58.5}

    # 2. a new revision on its own branch; main keeps its card
    v2_scores = write_results(tmp_path / "v2.json", str(vlm_output), vlm_output.name, {"synth_vqa": 66.6})
    third = push(vlm_output, REPO, results=[v2_scores, vlm_results["base"]], revision="v2", exist_ok=True, **quiet)
    assert third.revision == "v2" and third.url.endswith(f"/{REPO}/tree/v2")
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert refs == {"main": second.commit_oid, "v2": third.commit_oid}
    v2 = _download(hub, tmp_path, revision="v2", name="v2")
    plan = plan_push(vlm_output, REPO, results=[v2_scores, vlm_results["base"]])
    _assert_identical_to_output(v2, vlm_output, plan)
    assert [r.metric_value for r in ModelCard.load(v2 / "README.md").data.eval_results] == [66.6]
    assert ModelCard.load(_download(hub, tmp_path, name="main2") / "README.md").data.eval_results == main_card.data.eval_results

    # 3. transformers loads the pushed branch through the Hub API: same weights
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    remote = Qwen2VLForConditionalGeneration.from_pretrained(REPO, revision="v2", cache_dir=tmp_path / "tf")
    local = Qwen2VLForConditionalGeneration.from_pretrained(vlm_output)
    remote_state, local_state = remote.state_dict(), local.state_dict()
    assert remote_state.keys() == local_state.keys()
    assert all(torch.equal(remote_state[k], local_state[k]) for k in local_state)
    fetched = {r["path"] for r in hub.requests if r["method"] == "GET"}
    assert {f"/{REPO}/resolve/{third.commit_oid}/{p.name}" for p in vlm_output.glob("*.safetensors")} <= fetched


def test_existing_repo_needs_exist_ok(hub_env, vlm_output, fast_retry):
    hub = hub_env
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo(REPO)
    commits_before = dict(hub.state.repos[REPO].commits)
    with pytest.raises(RepoExistsError, match="already exists.*--exist-ok"):
        push(vlm_output, REPO, endpoint=hub.endpoint, retry=fast_retry, echo=lambda m: None)
    assert hub.state.repos[REPO].commits == commits_before


def test_missing_token_fails_before_any_request(hub_env, monkeypatch, vlm_output):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(MissingTokenError, match="HF_TOKEN.*hf auth login"):
        push(vlm_output, REPO, endpoint=hub_env.endpoint)
    with pytest.raises(MissingTokenError, match="MY_HUB_TOKEN is not set"):
        push(vlm_output, REPO, endpoint=hub_env.endpoint, token_env="MY_HUB_TOKEN")
    assert hub_env.requests == []


def test_offline_checks_come_before_the_network(hub_env, vlm_output, tmp_path):
    with pytest.raises(OutputFolderError, match="does not exist"):
        push(tmp_path / "no-such-output", REPO, endpoint=hub_env.endpoint)
    other = write_results(tmp_path / "r.json", "/models/another-merge", "another-merge", {"synth_chart": 1.0})
    with pytest.raises(ResultsError, match="another-merge"):
        push(vlm_output, REPO, results=[other], endpoint=hub_env.endpoint)
    assert hub_env.requests == []


def test_transient_server_errors_are_retried(hub_env, vlm_output, fast_retry):
    hub = hub_env
    hub.inject("GET", rf"^/api/models/{REPO}$", status=502)  # the exists check
    hub.inject("POST", r"^/api/repos/create$", status=503)
    hub.inject("POST", rf"^/api/models/{REPO}/commit/main$", status=500)
    messages = []
    result = push(vlm_output, REPO, endpoint=hub.endpoint, retry=fast_retry, echo=messages.append)
    commits = [r for r in hub.requests if r["path"] == f"/api/models/{REPO}/commit/main"]
    assert [r["status"] for r in commits] == [500, 200]
    assert [r["status"] for r in hub.requests if r["path"] == "/api/repos/create"] == [503, 200]
    assert sum("transient error" in m for m in messages) == 3
    assert hub.state.repos[REPO].branches["main"] == result.commit_oid


def test_failed_upload_leaves_the_output_untouched(hub_env, vlm_output, vlm_results, fast_retry):
    hub = hub_env
    before = folder_state(vlm_output)
    hub.inject("POST", rf"^/api/models/{REPO}/commit/main$", status=500, times=100)
    with pytest.raises(UploadError) as failure:
        push(vlm_output, REPO, results=_all_results(vlm_results), endpoint=hub.endpoint, retry=fast_retry,
             echo=lambda m: None)
    message = str(failure.value)
    assert "still failed after 3 attempt(s)" in message and "Nothing was written to" in message
    assert TOKEN not in message
    assert folder_state(vlm_output) == before
    assert len(hub.state.repos[REPO].commits) == 1  # only the repo's initial commit


def test_rejected_token_is_explained_without_echoing_it(hub_env, monkeypatch, vlm_output, fast_retry):
    monkeypatch.setenv("HF_TOKEN", TOKEN + "-revoked")
    with pytest.raises(UploadError, match="401 Unauthorized") as failure:
        push(vlm_output, REPO, endpoint=hub_env.endpoint, retry=fast_retry, echo=lambda m: None)
    assert TOKEN not in str(failure.value)
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)  # valid, but not alice's namespace
    with pytest.raises(UploadError, match="403 Forbidden") as failure:
        push(vlm_output, REPO, endpoint=hub_env.endpoint, retry=fast_retry, echo=lambda m: None)
    assert OTHER_TOKEN not in str(failure.value)


def test_private_push_never_lands_in_a_public_repo(hub_env, vlm_output, fast_retry):
    hub = hub_env
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo(REPO, private=False)
    with pytest.raises(UploadError, match="exists and is public"):
        push(vlm_output, REPO, private=True, exist_ok=True, endpoint=hub.endpoint, retry=fast_retry,
             echo=lambda m: None)
    assert len(hub.state.repos[REPO].commits) == 1
    private_repo = f"{USER}/private-merge"
    push(vlm_output, private_repo, private=True, endpoint=hub.endpoint, retry=fast_retry, echo=lambda m: None)
    assert hub.state.repos[private_repo].private
    with pytest.raises(Exception, match="Repository Not Found"):
        HfApi(endpoint=hub.endpoint, token=False).model_info(private_repo)


def test_a_token_pasted_into_the_output_is_never_uploaded(hub_env, vlm_output, tmp_path, fast_retry):
    out = tmp_path / "out"
    shutil.copytree(vlm_output, out)
    with (out / "mergekit_config.yml").open("a") as recipe:
        recipe.write(f"# hub token: {TOKEN}\n")
    with pytest.raises(UploadError, match="mergekit_config.yml contains your Hugging Face token") as failure:
        push(out, REPO, endpoint=hub_env.endpoint, retry=fast_retry, echo=lambda m: None)
    assert TOKEN not in str(failure.value)
    assert REPO not in hub_env.state.repos  # refused before any request
    assert hub_env.requests == []


def test_license_is_read_from_the_base_card_on_the_hub(hub_env, vlm_output, tmp_path, fast_retry):
    hub = hub_env
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(BASE_ID)
    base_card = tmp_path / "base_card.md"
    base_card.write_text("---\nlicense: apache-2.0\npipeline_tag: image-text-to-text\n---\n# Qwen2-VL-7B\n")
    api.upload_file(path_or_fileobj=str(base_card), path_in_repo="README.md", repo_id=BASE_ID)
    push(vlm_output, REPO, endpoint=hub.endpoint, retry=fast_retry, echo=lambda m: None)
    card = ModelCard(hub.file_bytes(REPO, "main", "README.md").decode())
    assert card.data.license == "apache-2.0"
    assert not files_containing(tmp_path, TOKEN)


def test_an_unreachable_hub_is_retried_then_reported(hub_env, vlm_output, fast_retry):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    messages = []
    with pytest.raises(UploadError, match=r"could not check the repository .* still failed after 3 attempt\(s\): ConnectError"):
        push(vlm_output, REPO, endpoint=f"http://127.0.0.1:{port}", retry=fast_retry, echo=messages.append)
    assert sum("transient error" in m for m in messages) == 2
