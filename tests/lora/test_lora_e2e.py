"""Stock mergekit-yaml, from the installed wheel, with LoRA adapter directories as experts."""

from __future__ import annotations

import json

import pytest

from lora_helpers import assert_state_dicts_close, run_merge
from mergekit_mllm.testing import recipe_for, state_dict, write_recipe

pytestmark = pytest.mark.e2e


def test_stock_mergekit_yaml_merges_adapter_directories_and_writes_an_adapter(fresh_env, lora_family, tmp_path):
    recipe = recipe_for("optmerge", lora_family["base"], lora_family["adapters"], {"iterations": 10},
                        lora_output={"rank": 10})
    out, cache = tmp_path / "out", tmp_path / "lora_cache"
    result = fresh_env.run([fresh_env.script("mergekit-yaml"), str(write_recipe(tmp_path / "r.yml", recipe)), str(out),
                            "--lora-merge-cache", str(cache)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not cache.exists() or not any(cache.iterdir())  # nothing materialised

    materialised = run_merge(recipe_for("optmerge", lora_family["base"], lora_family["materialised"],
                                        {"iterations": 10}), tmp_path / "reference")
    assert_state_dicts_close(state_dict(out), state_dict(materialised))
    report = json.loads((out / "mergekit_mllm_lora.json").read_text())
    assert report["low_rank_kernel_weights"] == {"optmerge": 14}
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "mergekit_mllm_report.json").read_text())["merge_method"] == "optmerge"
