"""Every shipped recipe parses, names real methods and parameters, and merges.

The real checkpoints are multi-GB Hub models; each recipe runs end to end on
tiny stand-ins with the same tensor names (the same family and key layout),
its model paths substituted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mergekit_mllm.testing import perturb_checkpoint, state_dict
from mergekit_mllm.testing.vlm import build_vlm

RECIPES = sorted(Path(__file__).resolve().parents[1].glob("recipes/*/*.yml"))
PAPER_METHODS = {"weight_average", "task_arithmetic", "ties_merging", "dare_task_arithmetic", "dare_ties_merging",
                 "tsv", "iso_c", "iso_cts", "wudi", "optmerge"}
# base model id -> (stand-in family, trust_remote_code)
STAND_INS = {
    "Qwen/Qwen2-VL-7B": ("qwen2_vl", False),
    "Qwen/Qwen2-VL-7B-Instruct": ("qwen2_vl", False),
    "OpenGVLab/InternVL2_5-1B": ("internvl_chat", True),
    "Qwen/Qwen2.5-VL-32B-Instruct": ("qwen2_5_vl", False),
    # the synthetic benchmark's family is a tiny Llama-based LLaVA (legacy key layout)
    "outputs/main/synth/base": ("llava", False),
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_configuration_has_all_ten_methods():
    by_config = {}
    for path in RECIPES:
        by_config.setdefault(path.parent.name, set()).add(path.stem)
    for config in ("qwen2vl_lora", "internvl2_5_1b", "qwen2vl_community", "qwen2_5vl_32b", "synth"):
        assert by_config.get(config) == PAPER_METHODS, config


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_is_valid_for_mergekit_and_the_plugin(path):
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration

    from mergekit_mllm.planner import check_recipe_parameters

    text = path.read_text()
    synthetic = path.parent.name == "synth"
    assert synthetic or (re.search(r"paper Table \d", text) and "{0.1, 0.3, 0.5, 0.7, 1.0, 1.5}" in text)
    config = MergeConfiguration.model_validate(load(path))
    method = merge_methods.get(config.merge_method)
    check_recipe_parameters(config, method)
    parameters = config.parameters or {}
    assert synthetic or parameters.get("preset") == "optmerge_paper"
    for name in parameters:  # values validate against the method's own parameter types
        spec = next((p for p in method.spec.parameters if p.name == name), None)
        if spec is not None:
            spec.validate(parameters[name])
    if config.merge_method == "optmerge":
        expected = "full" if path.parent.name in ("internvl2_5_1b", "synth") else "lora"
        assert parameters["variant"] == expected
    if "Qwen/Qwen2-VL-7B" == str(config.base_model):
        assert parameters.get("chat_template_donor"), "a base (non-instruct) model needs a template donor"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand_ins")
    cache = {}

    def get(family: str, count: int):
        if (family, count) not in cache:
            base = build_vlm(family, root / family / "base")
            experts = [perturb_checkpoint(base, root / family / f"expert{i}", seed=300 + i) for i in range(count)]
            cache[(family, count)] = (base, experts)
        return cache[(family, count)]

    return get


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_merges_tiny_stand_ins_with_the_same_tensor_names(path, stand_ins, tmp_path):
    from test_multimodal import run_merge

    recipe = load(path)
    family, remote = STAND_INS[recipe["base_model"]]
    base, experts = stand_ins(family, len(recipe["models"]))
    recipe["base_model"] = str(base)
    for entry, expert in zip(recipe["models"], experts):
        entry["model"] = str(expert)
    if "chat_template_donor" in recipe["parameters"]:
        recipe["parameters"]["chat_template_donor"] = str(experts[0])
    recipe["dtype"] = "float32"  # the stand-ins are float32 checkpoints
    out = run_merge(recipe, tmp_path / "out", trust_remote_code=remote)
    merged, reference = state_dict(out), state_dict(base)
    assert set(merged) == set(reference)
    report = json.loads((out / "mergekit_mllm_report.json").read_text())
    assert report["merge_method"] == recipe["merge_method"]
    assert report["preset"] == recipe["parameters"].get("preset")
    if report["preset"] == "optmerge_paper":
        assert report["policies"]["vision_tower"] == "base" and report["policies"]["language_model"] == "merge"


@pytest.mark.e2e
def test_a_shipped_recipe_file_runs_in_stock_mergekit_yaml(fresh_env, stand_ins, tmp_path):
    path = Path(__file__).resolve().parents[1] / "recipes" / "internvl2_5_1b" / "optmerge.yml"
    text = path.read_text()
    base, experts = stand_ins("internvl_chat", 5)
    text = text.replace("OpenGVLab/InternVL2_5-1B", str(base))
    for name, expert in zip(("VQA", "Geometry", "Chart", "OCR", "Grounding"), experts):
        text = text.replace(f"yongxianwei/InternVL2_5-1B_{name}", str(expert))
    text = text.replace("dtype: bfloat16", "dtype: float32")
    recipe = tmp_path / "optmerge.yml"
    recipe.write_text(text)
    result = fresh_env.run([fresh_env.script("mergekit-yaml"), "--trust-remote-code", str(recipe), str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-4000:]
    assert set(state_dict(tmp_path / "out")) == set(state_dict(base))
