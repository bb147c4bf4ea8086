"""Tiny seeded LoRA experts (peft adapters) and their materialised copies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lora_helpers import LINEAR  # noqa: E402


def _family(root: Path, base: Path, configs) -> dict:
    from mergekit_mllm.lora.testing import build_lora_expert

    adapters, materialised = [], []
    for index, config in enumerate(configs):
        adapters.append(build_lora_expert(base, root / f"lora{index}", seed=300 + index,
                                          materialise=root / f"materialised{index}", **config))
        materialised.append(root / f"materialised{index}")
    return {"base": base, "adapters": adapters, "materialised": materialised}


@pytest.fixture(scope="session")
def qwen2_base(tmp_path_factory):
    from mergekit_mllm.testing import build_qwen2

    return build_qwen2(tmp_path_factory.mktemp("lora_base") / "base")


@pytest.fixture(scope="session")
def lora_family(tmp_path_factory, qwen2_base):
    """Three low-rank experts (r ≤ 4 on 32-wide weights) exercising peft's
    options: rank/alpha patterns, rsLoRA, trained biases, an embedding LoRA
    and a modules_to_save lm_head."""
    return _family(tmp_path_factory.mktemp("lora_family"), qwen2_base, [
        dict(r=4, lora_alpha=8, target_modules=LINEAR, rank_pattern={"down_proj": 2},
             alpha_pattern={"layers.1.self_attn.q_proj": 3}),
        dict(r=4, lora_alpha=16, target_modules=LINEAR, use_rslora=True, bias="lora_only"),
        dict(r=2, lora_alpha=4, target_modules=LINEAR + ["embed_tokens"], modules_to_save=["lm_head"]),
    ])


@pytest.fixture(scope="session")
def full_rank_lora_family(tmp_path_factory, qwen2_base):
    """Three r=16 experts: every Σ τᵢ is full rank, so the dense SVD methods
    are well defined and must agree exactly with the low-rank kernels."""
    return _family(tmp_path_factory.mktemp("full_rank_lora"), qwen2_base,
                   [dict(r=16, lora_alpha=16, target_modules=LINEAR)] * 3)


@pytest.fixture(scope="session")
def qwen2_vl_lora_family(tmp_path_factory):
    """Adapters over a Qwen2-VL checkpoint in the legacy layout: peft names the
    modules by transformers' in-memory paths (model.language_model.…)."""
    from mergekit_mllm.testing.vlm import build_vlm

    root = tmp_path_factory.mktemp("qwen2_vl_lora")
    base = build_vlm("qwen2_vl", root / "base")
    return _family(root, base, [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv", "fc1"]),
        dict(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj", "up_proj"]),
    ])
