"""Fixtures of the hub tests: a local Hub-API server, merge outputs, results files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_fixtures import (  # noqa: E402
    BASE_ID,
    EXPERT_IDS,
    OTHER_TOKEN,
    RECIPE_TEXT,
    REPORT,
    TOKEN,
    USER,
    tiny_qwen2_vl,
    write_results,
)
from hub_test_server import HubServer  # noqa: E402


@pytest.fixture
def hub():
    """A fresh test hub per test; alice may also write to the Qwen org."""
    server = HubServer({TOKEN: (USER, ["Qwen"]), OTHER_TOKEN: ("mallory", [])},
                       multipart_threshold=12 * 1024, chunk_size=5 * 1024).start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """Point huggingface_hub (this process and subprocesses) at the test hub.

    Xet is disabled because the test hub speaks LFS only; the saved-login
    file is redirected so a developer's own token can never be picked up.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    yield hub
    if not were_disabled:
        enable_progress_bars()


@pytest.fixture
def use_hub_endpoint(hub_env, monkeypatch):
    """Also route the module-level default endpoint (used by from_pretrained) to the test hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_env.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_env.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    return hub_env


@pytest.fixture(scope="session")
def vlm_output(tmp_path_factory) -> Path:
    """A merge output folder as the multimodal layer writes it (report + recipe + mergekit card)."""
    out = tiny_qwen2_vl(tmp_path_factory.mktemp("merged") / "qwen2-vl-optmerge")
    (out / "mergekit_config.yml").write_text(RECIPE_TEXT)
    (out / "mergekit_mllm_report.json").write_text(json.dumps(REPORT, indent=2))
    (out / "README.md").write_text("---\nbase_model: []\ntags:\n- mergekit\n- merge\n---\n# mergekit's card\n")
    return out


@pytest.fixture(scope="session")
def mergekit_output(qwen2_family, tmp_path_factory) -> Path:
    """A real, sharded output of mergekit's run_merge (with the plugin's merge report)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_mllm.testing import recipe_for

    recipe = recipe_for("task_arithmetic", qwen2_family["base"], qwen2_family["experts"], parameters={"weight": 0.5})
    out = tmp_path_factory.mktemp("mergekit") / "qwen2-ta"
    run_merge(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(out_shard_size=8000, quiet=True),
              config_source=yaml.safe_dump(recipe, sort_keys=False))
    return out


@pytest.fixture
def vlm_results(vlm_output, tmp_path):
    """Results of the merged model, its base and one expert (different files, same tasks)."""
    merged = write_results(tmp_path / "merged.json", str(vlm_output), vlm_output.name,
                           {"synth_chart": 71.2, "synth_ocr": 55.0, "synth_vqa": 62.5})
    base = write_results(tmp_path / "base.json", BASE_ID, BASE_ID,
                         {"synth_chart": 40.1, "synth_ocr": 30.0, "synth_vqa": 50.0})
    expert = write_results(tmp_path / "ocr.json", EXPERT_IDS[0], EXPERT_IDS[0],
                           {"synth_chart": 35.0, "synth_ocr": 64.7, "synth_vqa": 45.2})
    return {"merged": merged, "base": base, "expert": expert}


@pytest.fixture
def fast_retry():
    from mergekit_mllm.hub.push import RetryPolicy

    return RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.01)
