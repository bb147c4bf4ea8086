"""The recipe's ``hub:`` section: validated before merging, pushed after it."""

from __future__ import annotations

import pytest
import yaml
from hub_fixtures import TOKEN, USER, write_results
from huggingface_hub import ModelCard

from mergekit_mllm.hub.auto import KEYS, parse_hub_section, push_after_merge, validate_hub_section
from mergekit_mllm.hub.errors import HubSectionError, MissingTokenError, RepoExistsError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:httpx2")


def recipe_with(hub) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": "/m/base", "models": [{"model": "/m/e0"}], "hub": hub}


@pytest.mark.parametrize(
    "hub, message",
    [
        ({"repo": "alice/x", "privte": True}, r"unknown key `privte` \(did you mean `private`\?\)"),
        ({"repo": "alice/x", "colour": "red"}, "unknown key `colour`; allowed keys: repo, private"),
        ({"repo": "alice/x", "token": "x"}, "`token` is not allowed: never put a token in a recipe"),
        ({"private": True}, "`repo: OWNER/NAME` is required"),
        ({"repo": "just-a-name"}, "must be OWNER/NAME"),
        ({"repo": "alice/x", "private": "yes"}, "private must be true or false"),
        ({"repo": "alice/x", "results": [3]}, "results must be paths"),
        ({"repo": "alice/x", "results": "nowhere.json"}, "results file nowhere.json does not exist"),
        ({"repo": "alice/x", "revision": "a" * 40}, "must be a branch name"),
        ({"repo": "alice/x", "token_env": "not a name"}, "token_env must be the name of an environment variable"),
        ({"repo": "alice/x", "plot": "missing.png"}, "plot image missing.png does not exist"),
        ("alice/x", "must be a mapping"),
        ({"repo": "alice/x", "evaluate": {"task": "synth"}}, r"evaluate: unknown key `task` \(did you mean `tasks`\?\)"),
        ({"repo": "alice/x", "evaluate": {"limit": 5}}, "evaluate: `tasks` is required"),
        ({"repo": "alice/x", "evaluate": {"tasks": "synth", "limit": 0}}, "evaluate: limit must be a positive integer"),
        ({"repo": "alice/x", "evaluate": {"tasks": "synth", "split": "train"}}, "evaluate: split must be val or test"),
    ],
)
def test_bad_hub_sections_fail_before_merging(hub, message):
    with pytest.raises(HubSectionError, match=message):
        validate_hub_section(recipe_with(hub))


def test_a_token_value_is_refused_without_being_echoed():
    with pytest.raises(HubSectionError) as failure:
        validate_hub_section(recipe_with({"repo": "alice/x", "commit_message": TOKEN}))
    assert "looks like a Hugging Face token" in str(failure.value)
    assert TOKEN not in str(failure.value)


def test_missing_token_fails_validation(hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(MissingTokenError):
        validate_hub_section(recipe_with({"repo": "alice/x"}))
    monkeypatch.setenv("CI_HUB_TOKEN", TOKEN)
    validate_hub_section(recipe_with({"repo": "alice/x", "token_env": "CI_HUB_TOKEN"}))


def test_no_hub_section_means_no_push(hub_env, vlm_output):
    recipe = recipe_with(None)
    validate_hub_section(recipe)
    assert parse_hub_section(recipe) is None
    assert push_after_merge(vlm_output, recipe) is None
    assert hub_env.requests == []


def test_every_documented_key_is_accepted(hub_env, vlm_output, tmp_path):
    results = write_results(tmp_path / "r.json", str(vlm_output), vlm_output.name, {"synth_ocr": 50.0})
    plot = tmp_path / "scores.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 16)
    hub = {"repo": "alice/x", "private": True, "revision": "v2", "exist_ok": True, "results": [str(results)],
           "token_env": "HF_TOKEN", "license": "apache-2.0", "plot": str(plot), "commit_message": "msg",
           "evaluate": {"tasks": "synth", "limit": 5, "split": "val", "device": "cpu", "batch_size": 2, "dtype": "float32"}}
    assert set(hub) == set(KEYS)
    section = parse_hub_section(recipe_with(hub))
    assert section.results == (str(results),) and section.private and section.plot == str(plot)
    assert dict(section.evaluate)["limit"] == 5 and parse_hub_section(recipe_with({"repo": "a/b", "evaluate": "synth"})).evaluate == (("tasks", "synth"),)


def test_mergekit_run_merge_pushes_when_the_recipe_asks(hub_env, qwen2_family, tmp_path, monkeypatch):
    """Through the plugin's run_merge wrapper: validate before merging, push after."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_mllm.testing import recipe_for

    monkeypatch.chdir(tmp_path)  # relative results paths are read from the working directory
    base_results = write_results(tmp_path / "base.json", str(qwen2_family["base"]), "base", {"synth_chart": 20.0})
    recipe = recipe_for("task_arithmetic", qwen2_family["base"], qwen2_family["experts"], parameters={"weight": 0.5})
    merge_config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(out_shard_size=20000, quiet=True)

    # a bad hub: section stops the merge before any output is written
    bad = dict(recipe, hub={"repo": f"{USER}/ta-merge", "privte": True})
    with pytest.raises(HubSectionError, match="unknown key `privte`"):
        run_merge(merge_config, str(tmp_path / "never"), options, config_source=yaml.safe_dump(bad, sort_keys=False))
    assert not (tmp_path / "never").exists() and hub_env.requests == []

    recipe["hub"] = {"repo": f"{USER}/ta-merge", "results": [base_results.name], "license": "mit"}
    out = tmp_path / "merged"
    run_merge(merge_config, str(out), options, config_source=yaml.safe_dump(recipe, sort_keys=False))
    assert f"{USER}/ta-merge" in hub_env.state.repos

    card = ModelCard(hub_env.file_bytes(f"{USER}/ta-merge", "main", "README.md").decode())
    assert card.data.license == "mit" and card.data.eval_results is None
    assert "| synth_chart | relaxed_accuracy | — | 20.00 |" in card.text
    assert "hub:" in card.text and "repo: alice/ta-merge" in card.text  # the recipe, hub section included
    assert TOKEN not in card.text

    # pushing again without exist_ok: refused with a retry hint for the upload only
    with pytest.raises(RepoExistsError) as failure:
        push_after_merge(out, recipe)
    assert "The merge itself succeeded" in str(failure.value)
    assert f"mergekit-mllm push {out} --repo {USER}/ta-merge --exist-ok --results base.json" in str(failure.value)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    """A model eval_suite can score offline: the base of the smoke-size synthetic family."""
    import subprocess
    import sys

    family = tmp_path_factory.mktemp("synth_smoke")
    subprocess.run([sys.executable, "-m", "eval_suite", "synth", "build", "--size", "smoke", "--out", str(family)],
                   check=True, capture_output=True)
    return family / "base"


def _as_merge_output(model, vlm_output, out):
    import shutil

    shutil.copytree(model, out)
    for name in ("mergekit_config.yml", "mergekit_mllm_report.json", "README.md"):
        shutil.copy(vlm_output / name, out / name)
    return out


def test_evaluate_scores_the_merged_model_before_pushing(hub_env, vlm_output, smoke_model, tmp_path):
    import json

    out = _as_merge_output(smoke_model, vlm_output, tmp_path / "merged")
    recipe = recipe_with({"repo": f"{USER}/evaluated",
                          "evaluate": {"tasks": "synth_ocr,synth_chart", "limit": 3, "split": "val"}})
    push_after_merge(out, recipe)
    results = json.loads((tmp_path / "merged.eval_results.json").read_text())
    assert results["model"]["path"] == str(out.resolve())
    assert set(results["tasks"]) == {"synth_ocr", "synth_chart"}
    assert all(t["num_items"] == 3 and t["split"] == "val" for t in results["tasks"].values())
    assert not (out / "merged.eval_results.json").exists()  # the model folder stays as merged

    card = ModelCard(hub_env.file_bytes(f"{USER}/evaluated", "main", "README.md").decode())
    assert sorted(r.metric_value for r in card.data.eval_results) == pytest.approx(
        sorted(t["score"] for t in results["tasks"].values()), abs=0.01
    )

def test_failed_evaluation_pushes_nothing(hub_env, vlm_output, smoke_model, tmp_path):
    from mergekit_mllm.hub.errors import PushError

    out = _as_merge_output(smoke_model, vlm_output, tmp_path / "merged")
    with pytest.raises(PushError, match="evaluating the merged model failed") as failure:
        push_after_merge(out, recipe_with({"repo": f"{USER}/never", "evaluate": {"tasks": "no_such_task"}}))
    assert "The merge itself succeeded" in str(failure.value)
    assert f"{USER}/never" not in hub_env.state.repos
