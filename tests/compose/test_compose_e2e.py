"""Stock mergekit-yaml, from the installed wheel, composing three modality experts."""

from __future__ import annotations

import json

import pytest
import torch

from compose_helpers import compose_recipe, load_composed, logits
from mergekit_mllm.testing import write_recipe

pytestmark = pytest.mark.e2e


def test_stock_mergekit_yaml_composes_a_lora_and_two_full_experts(fresh_env, modality_experts, tmp_path):
    experts = [modality_experts[kind] for kind in ("image", "audio", "video")]
    recipe = write_recipe(tmp_path / "compose.yml",
                          compose_recipe("optmerge", modality_experts["base"], experts, {"iterations": 10}))
    out = tmp_path / "out"
    result = fresh_env.run([fresh_env.script("mergekit-yaml"), str(recipe), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "mergekit_mllm_compose.json").read_text())
    assert sorted(report["modalities"]) == ["audio", "image", "video"]
    assert json.loads((out / "mergekit_mllm_report.json").read_text())["merge_method"] == "optmerge"
    model, processor, info = load_composed(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for kind in ("image", "audio", "video"):
        assert torch.isfinite(logits(model, processor, kind)).all()
