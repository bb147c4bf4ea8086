"""The card and the results matching (offline: no server, no token)."""

from __future__ import annotations

import json
import shutil

import pytest
from hub_fixtures import BASE_ID, EXPERT_IDS, REPORT, results_payload, write_results
from huggingface_hub import ModelCard

from mergekit_mllm.hub.card import PLOT_NAME, pipeline_tag_for
from mergekit_mllm.hub.errors import OutputFolderError, ResultsError
from mergekit_mllm.hub.plot import PNG_MAGIC
from mergekit_mllm.hub.push import plan_push


def test_card_metadata_body_and_round_trip(vlm_output, vlm_results, tmp_path):
    plan = plan_push(vlm_output, "alice/qwen2-vl-optmerge", license="apache-2.0",
                     results=[vlm_results["merged"], vlm_results["base"], vlm_results["expert"]])
    card_path = tmp_path / "README.md"
    card_path.write_bytes(plan.card_bytes)
    loaded = ModelCard.load(card_path)
    data = loaded.data

    assert data.base_model == [BASE_ID, *EXPERT_IDS]
    assert data.get("base_model_relation") == "merge"
    assert data.tags == ["merge", "mergekit", "mergekit-mllm", "optmerge"]
    assert data.pipeline_tag == "image-text-to-text"
    assert data.license == "apache-2.0"
    assert data.model_name == "qwen2-vl-optmerge"

    # model-index: one result per task, exactly the merged model's numbers
    merged = json.loads(vlm_results["merged"].read_text())
    assert data.eval_results == plan.card.data.eval_results
    by_dataset = {r.dataset_name: r for r in data.eval_results}
    assert set(by_dataset) == set(merged["tasks"])
    for task, raw in merged["tasks"].items():
        result = by_dataset[task]
        assert (result.dataset_type, result.dataset_split, result.dataset_revision) == (raw["dataset_id"], "test", "v1")
        assert (result.metric_type, result.metric_value) == (raw["metric"], raw["score"])
        assert result.task_type == "visual-question-answering"
        assert result.metric_args["prompt_version"] == "synth-v1"

    body = loaded.text
    assert "[OptMerge](https://arxiv.org/abs/2505.19892)" in body
    assert "`optmerge_paper`" in body
    for component, policy in REPORT["policies"].items():
        assert f"| `{component}` | `{policy}` |" in body
    assert "| synth_ocr | exact_match | 55.00 | 30.00 | **64.70** |" in body  # merged | base | expert
    assert "| synth_chart | relaxed_accuracy | **71.20** | 40.10 | 35.00 |" in body
    assert "| **Average** |  | 62.90 | 40.03 | 48.30 |" in body
    assert f"![Scores per task]({PLOT_NAME})" in body and plan.plot.startswith(PNG_MAGIC)
    assert "```yaml\nmerge_method: optmerge" in body  # the recipe
    assert "| mergekit-mllm | 0.1.0 |" in body and "| eval prompt set | synth-v1 |" in body


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}, "image-text-to-text"),
        ({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "vision_config": {}}, "image-text-to-text"),
        ({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
          "architectures": ["LlavaLlamaForCausalLM"]}, "image-text-to-text"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "text-generation"),
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, None),
    ],
)
def test_pipeline_tag_is_decided_from_config(config, expected):
    assert pipeline_tag_for(config) == expected


def test_the_merge_report_drives_the_card(mergekit_output, qwen2_family):
    plan = plan_push(mergekit_output, "alice/qwen2-ta")
    body = plan.card.text
    assert "| `language_model` | weights | `merge` | 14 |" in body  # decisions actually applied
    assert "Component policies of the recipe" in body
    assert "| transformers | 5." in body and "| mergekit-mllm | 0." in body
    # experts in the recipe's order even if the report lists them otherwise
    listed = [line for line in body.splitlines() if line.startswith("- **Expert:**")]
    assert listed == [f"- **Expert:** `{p}` (local)" for p in qwen2_family["experts"]]


def test_plain_mergekit_output_falls_back_to_its_recipe(mergekit_output, tmp_path):
    out = tmp_path / "plain"
    shutil.copytree(mergekit_output, out)
    (out / "mergekit_mllm_report.json").unlink()  # as stock mergekit alone writes it
    plan = plan_push(out, "alice/qwen2-ta")
    data, body = plan.card.data, plan.card.text
    assert data.pipeline_tag == "text-generation"
    assert "task_arithmetic" in data.tags
    # local inputs cannot be Hub base models: no base_model, hence no relation either
    assert data.base_model is None and data.get("base_model_relation") is None
    assert data.eval_results is None and plan.plot is None
    assert "Not recorded" in body and "(local)" in body
    assert "No evaluation results were attached" in body
    # every shard of the real mergekit output is planned, the old card is replaced
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    planned = [item.path_in_repo for item in plan.items]
    assert len(shards) > 1 and all(name in planned for name in shards)
    assert planned.count("README.md") == 1
    assert next(i for i in plan.items if i.path_in_repo == "README.md").source == plan.card_bytes


def test_license_comes_from_the_local_base_card(mergekit_output, qwen2_family, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mergekit_output, out)
    base = qwen2_family["base"]
    card = base / "README.md"
    card.write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# base\n")
    try:
        plan = plan_push(out, "alice/qwen2-ta")
    finally:
        card.unlink()
    assert (plan.card.data.license, plan.card.data.license_name, plan.card.data.license_link) == (
        "other", "tiny-license", "LICENSE")


def test_results_for_another_model_are_refused(vlm_output, tmp_path):
    stranger = tmp_path / "other-merge"
    stranger.mkdir()
    wrong = write_results(tmp_path / "wrong.json", str(stranger), "other-merge", {"synth_chart": 50.0})
    with pytest.raises(ResultsError, match="other-merge.*not this merge"):
        plan_push(vlm_output, "alice/x", results=[wrong])


def test_results_of_a_moved_folder_match_by_name(vlm_output, tmp_path):
    moved = write_results(tmp_path / "moved.json", "/elsewhere/qwen2-vl-optmerge", vlm_output.name, {"synth_ocr": 50.0})
    plan = plan_push(vlm_output, "alice/x", results=[moved])
    assert plan.evalset.merged is not None and plan.card.data.eval_results[0].metric_value == 50.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(suite="lm-eval"), '"suite" must be "eval_suite"'),
        (lambda d: d["tasks"]["synth_chart"].update(score=0.712e3), "scores are 0-100"),
        (lambda d: d["tasks"]["synth_chart"].pop("metric"), "synth_chart.metric is required"),
        (lambda d: d.update(model={}), '"model" must name the evaluated model'),
        (lambda d: d.update(tasks={}), '"tasks" must be a non-empty object'),
    ],
)
def test_malformed_results_name_the_problem(vlm_output, tmp_path, mutate, message):
    payload = results_payload(str(vlm_output), vlm_output.name, {"synth_chart": 71.2})
    mutate(payload)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ResultsError, match=message):
        plan_push(vlm_output, "alice/x", results=[path])


def test_two_results_for_the_merged_model_are_refused(vlm_output, tmp_path):
    a = write_results(tmp_path / "a.json", str(vlm_output), vlm_output.name, {"synth_chart": 1.0})
    b = write_results(tmp_path / "b.json", str(vlm_output), vlm_output.name, {"synth_chart": 2.0})
    with pytest.raises(ResultsError, match="two results files are for the merged model"):
        plan_push(vlm_output, "alice/x", results=[a, b])


def test_inconsistent_prompt_sets_are_noted_on_the_card(vlm_output, tmp_path):
    merged = write_results(tmp_path / "m.json", str(vlm_output), vlm_output.name, {"synth_chart": 70.0})
    base = write_results(tmp_path / "b.json", BASE_ID, BASE_ID, {"synth_chart": 60.0}, prompt_version="synth-v0")
    plan = plan_push(vlm_output, "alice/x", results=[merged, base])
    assert any("prompt_version 'synth-v0' differs" in note for note in plan.evalset.notes)
    assert "synth-v0" in plan.card.text


def test_comparison_results_without_the_merged_model(vlm_output, vlm_results):
    plan = plan_push(vlm_output, "alice/x", results=[vlm_results["base"]])
    assert plan.card.data.eval_results is None  # model-index is only ever this model's scores
    assert "| synth_chart | relaxed_accuracy | — | 40.10 |" in plan.card.text


@pytest.mark.parametrize("broken", ["missing", "no_config", "missing_shard"])
def test_output_folder_problems_are_explained(vlm_output, tmp_path, broken):
    out = tmp_path / "out"
    if broken != "missing":
        shutil.copytree(vlm_output, out)
    if broken == "no_config":
        (out / "config.json").unlink()
    if broken == "missing_shard":
        next(out.glob("model-00002-*.safetensors")).unlink()
    expected = {"missing": "does not exist", "no_config": "no config.json", "missing_shard": "lists shards"}[broken]
    with pytest.raises(OutputFolderError, match=expected):
        plan_push(out, "alice/x")

