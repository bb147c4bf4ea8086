"""Modality composition: three single-modality experts into one model that takes all three."""

from __future__ import annotations

import json

import pytest
import torch

from compose_helpers import (
    PROMPTS,
    compose_recipe,
    load_composed,
    load_expert,
    logits,
    modality_inputs,
    run_merge,
)
from mergekit_mllm.testing import state_dict

KINDS = ("image", "audio", "video")


@pytest.fixture(scope="module")
def composed(modality_experts, tmp_path_factory):
    """TSV (the paper's best on Table 5) over the shared LLM."""
    out = tmp_path_factory.mktemp("composed") / "out"
    experts = [modality_experts[kind] for kind in KINDS]
    return run_merge(compose_recipe("tsv", modality_experts["base"], experts), out)


def test_composition_loads_and_runs_a_forward_pass_per_modality(composed):
    model, processor, info = load_composed(composed)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "ComposeForConditionalGeneration"
    assert sorted(model.config.modalities) == sorted(KINDS)
    for kind in KINDS:
        out = logits(model, processor, kind)
        length = 2 + model.config.modalities[kind]["tokens_per_item"]  # a word, the placeholders, a word
        assert out.shape == (1, length, 128) and torch.isfinite(out).all()
    # all three at once, and generation
    inputs = processor(" ".join(PROMPTS.values()),
                       **{k: v for kind in KINDS for k, v in modality_inputs(kind).items()})
    assert {"pixel_values", "input_features", "pixel_values_videos"} <= set(inputs)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[-1] == inputs["input_ids"].shape[-1] + 3


def test_each_modality_is_its_expert_with_the_merged_language_model(modality_experts, composed):
    """Put the composed LLM into each expert: the expert then computes exactly
    what the composition computes on that modality's input."""
    model, processor, _ = load_composed(composed)
    for kind in KINDS:
        expert, expert_processor = load_expert(modality_experts[kind])
        expert.language_model.load_state_dict(model.language_model.state_dict())
        torch.testing.assert_close(logits(model, processor, kind), logits(expert, expert_processor, kind),
                                   rtol=1e-5, atol=1e-5)


def test_encoders_and_projectors_are_kept_and_reported(modality_experts, composed):
    merged = state_dict(composed)
    report = json.loads((composed / "mergekit_mllm_compose.json").read_text())
    llm = [name for name in merged if name.startswith("language_model.")]
    assert report["shared_tensors"] == len(llm) and report["base_name_prefix_removed"] == "language_model."
    for kind in KINDS:
        entry = report["experts"][str(modality_experts[kind])]
        assert entry["modalities"] == [kind] and entry["lora"] == (kind == "audio")
        assert entry["unique"] and all(n.startswith((f"encoders.{kind}.", f"projectors.{kind}.")) for n in entry["unique"])
        expert, _ = load_expert(modality_experts[kind])
        expert_state = expert.state_dict()
        for name in entry["unique"]:
            assert torch.equal(merged[name], expert_state[name]), name
    assert set(merged) == set(llm).union(*(report["experts"][str(modality_experts[k])]["unique"] for k in KINDS))
    # placeholders are new tokens after the base vocabulary, one per modality
    assert sorted(m["token_id"] for m in report["modalities"].values()) == [128, 129, 130]


def test_shared_llm_is_merged_with_the_recipe_method_and_policies(modality_experts, tmp_path):
    experts = [modality_experts[kind] for kind in KINDS]
    out = run_merge(compose_recipe("weight_average", modality_experts["base"], experts, {"norms": "base"}),
                    tmp_path / "out")
    merged, base = state_dict(out), state_dict(modality_experts["base"])
    llms = [load_expert(modality_experts[kind])[0].language_model.state_dict() for kind in KINDS]
    for name, tensor in base.items():
        if "norm" in name:
            assert torch.equal(merged[f"language_model.{name}"], tensor), name
        else:
            expected = tensor + sum(llm[name] - tensor for llm in llms) / len(llms)
            torch.testing.assert_close(merged[f"language_model.{name}"], expected, rtol=1e-5, atol=1e-6)
    decisions = json.loads((out / "mergekit_mllm_compose.json").read_text())["decisions"]
    assert {"kind": "norms", "action": "base", "tensors": 5} in decisions


# ------------------------------------------------------------ refusals


def test_two_experts_of_one_modality_cannot_be_composed(modality_experts, tmp_path):
    experts = [modality_experts["image"], modality_experts["image"].parent / "vision_twin"]
    import shutil

    shutil.copytree(modality_experts["image"], experts[1])
    with pytest.raises(ValueError, match="modality 'image' comes from both"):
        run_merge(compose_recipe("weight_average", modality_experts["base"], experts), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_expert_trained_over_another_llm_is_refused(modality_experts, tmp_path):
    from mergekit_mllm.compose.testing import build_compose_base, build_modality_expert

    other = build_compose_base(tmp_path / "other_llm", seed=7)
    stray = build_modality_expert("audio", other, tmp_path / "stray_audio", seed=4, lora=True)
    experts = [modality_experts["image"], stray]
    with pytest.raises(ValueError, match="differs from base_model"):
        run_merge(compose_recipe("weight_average", modality_experts["base"], experts), tmp_path / "out")


@pytest.mark.parametrize("section, message", [
    ({"adapter_base": {}}, "unknown key"),
    ({"adapter_bases": ["x"]}, "must map adapter paths"),
])
def test_compose_section_is_checked(modality_experts, tmp_path, section, message):
    recipe = compose_recipe("weight_average", modality_experts["base"], [modality_experts["image"]])
    recipe["compose"] = section
    with pytest.raises(ValueError, match=message):
        run_merge(recipe, tmp_path / "out")
