"""Helpers of the LoRA tests: in-process merges and tensor comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_merge(recipe: dict, out: Path, **options) -> Path:
    """mergekit's own run_merge (with the plugin's extensions), in process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    source = yaml.safe_dump(recipe, sort_keys=False)
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    mergekit_run_merge(config, str(out), options=MergeOptions(quiet=True, **options), config_source=source)
    return out


def lora_report(out: Path) -> dict:
    return json.loads((out / "mergekit_mllm_lora.json").read_text())


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


def assert_state_dicts_close(actual: dict, expected: dict, atol=2e-5, rtol=1e-4):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
