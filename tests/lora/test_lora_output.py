"""lora_output: the merged model as a rank-k peft adapter over its base."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lora_helpers import lora_report, run_merge
from mergekit_mllm.testing import recipe_for, state_dict


def load_merged_adapter(base, adapter):
    """The base with the adapter merged in, by peft itself."""
    import peft
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        return peft.PeftModel.from_pretrained(model, adapter), model


@pytest.fixture(scope="module")
def full_expert_merge(qwen2_family, tmp_path_factory):
    """Task Arithmetic of three full-rank experts with a rank-3 adapter output."""
    out = tmp_path_factory.mktemp("lora_output") / "out"
    recipe = recipe_for("task_arithmetic", qwen2_family["base"], qwen2_family["experts"],
                        lora_output={"rank": 3, "path": "adapter"})
    recipe["models"] = [dict(m, parameters={"weight": 0.5}) for m in recipe["models"]]
    return run_merge(recipe, out)


def test_adapter_reproduces_the_merged_delta_within_the_reported_energy(qwen2_family, full_expert_merge):
    report = lora_report(full_expert_merge)["lora_output"]
    assert report["path"] == "adapter" and report["rank"] == 3
    peft_model, _ = load_merged_adapter(qwen2_family["base"], full_expert_merge / "adapter")
    adapted = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    base, merged = state_dict(qwen2_family["base"]), state_dict(full_expert_merge)
    assert len(report["lora_tensors"]) == 2 * 7 + 2  # every linear incl. lm_head, and the embedding
    for name, entry in report["lora_tensors"].items():
        delta = merged[name].double() - base[name].double()
        residual = adapted[name].double() - merged[name].double()
        # Eckart–Young: what is lost is exactly the energy not kept
        lost = float(residual.square().sum() / delta.square().sum())
        assert lost == pytest.approx(1.0 - entry["energy_kept"], abs=1e-5), name
        assert entry["rank"] == 3 and 0.0 < entry["energy_kept"] < 1.0
        assert entry["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
    # norms (and biases of adapted modules) are reproduced exactly
    for name in report["saved_whole"]:
        torch.testing.assert_close(adapted[name], merged[name], rtol=0, atol=0)
    assert any("norm" in name for name in report["saved_whole"])
    assert any(name.endswith("q_proj.bias") for name in report["saved_whole"])
    assert report["dropped"] == {}
    kept = sum(e["energy_kept"] * e["delta_norm"] ** 2 for e in report["lora_tensors"].values()) \
        + sum(n**2 for n in report["saved_whole"].values())
    total = sum(e["delta_norm"] ** 2 for e in report["lora_tensors"].values()) \
        + sum(n**2 for n in report["saved_whole"].values())
    assert report["energy_kept"] == pytest.approx(kept / total)


def test_adapter_output_generates_on_the_base(qwen2_family, full_expert_merge):
    peft_model, _ = load_merged_adapter(qwen2_family["base"], full_expert_merge / "adapter")
    input_ids = torch.tensor([[3, 10, 11, 12]])
    generated = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_lora_experts_round_trip_through_a_large_enough_adapter(lora_family, tmp_path):
    """Σ of three rank ≤ 4 LoRAs has rank ≤ 10: a rank-10 adapter is exact —
    except lm_head, which one expert trained whole (modules_to_save)."""
    out = run_merge(recipe_for("weight_average", lora_family["base"], lora_family["adapters"],
                               lora_output={"rank": 10}), tmp_path / "out")
    report = lora_report(out)["lora_output"]
    assert report["path"] == "lora_adapter"
    energies = {name: entry["energy_kept"] for name, entry in report["lora_tensors"].items()}
    assert energies.pop("lm_head.weight") < 0.999
    assert min(energies.values()) == pytest.approx(1.0, abs=1e-6)
    peft_model, _ = load_merged_adapter(lora_family["base"], out / "lora_adapter")
    adapted = peft_model.merge_and_unload().state_dict()
    for name, tensor in state_dict(out).items():
        if name != "lm_head.weight":
            torch.testing.assert_close(adapted[name], tensor, atol=2e-6, rtol=1e-5)
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 10 and "lm_head" in config["target_modules"]
    assert config["bias"] == "lora_only"  # one expert trained the q/k/v biases


def test_without_modules_to_save_other_changes_are_reported_as_dropped(qwen2_family, tmp_path):
    out = run_merge(recipe_for("weight_average", qwen2_family["base"], qwen2_family["experts"],
                               lora_output={"rank": 2, "modules_to_save": False}), tmp_path / "out")
    report = lora_report(out)["lora_output"]
    assert any("norm" in name for name in report["dropped"])
    assert all("norm" not in name for name in report["saved_whole"])
    lora = report["lora_tensors"].values()
    kept = sum(e["energy_kept"] * e["delta_norm"] ** 2 for e in lora) + sum(n**2 for n in report["saved_whole"].values())
    total = sum(e["delta_norm"] ** 2 for e in lora) + sum(n**2 for n in report["saved_whole"].values())
    dropped = sum(n**2 for n in report["dropped"].values())
    assert report["energy_kept"] == pytest.approx(kept / (total + dropped))  # dropped changes count as lost
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None


@pytest.mark.parametrize("section, message", [
    ({"path": "x"}, "rank"),
    ({"rank": 0}, "rank"),
    ({"rank": 4, "rnak": 4}, "unknown key"),
    ({"rank": "4"}, "must be int"),
    ({"rank": 4, "path": "../outside"}, "relative path inside"),
])
def test_lora_output_section_is_checked_before_merging(qwen2_family, tmp_path, section, message):
    recipe = recipe_for("weight_average", qwen2_family["base"], qwen2_family["experts"], lora_output=section)
    with pytest.raises(ValueError, match=message):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
