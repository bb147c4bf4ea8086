"""Tiny seeded single-modality experts over one shared LLM (ModelCompose layout)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def modality_experts(tmp_path_factory):
    """The shared LLM, a full vision expert, a LoRA audio expert (over its own
    base: LLM + encoder + projector) and a full video expert."""
    from mergekit_mllm.compose.testing import build_compose_base, build_modality_expert

    root = tmp_path_factory.mktemp("modality_experts")
    base = build_compose_base(root / "llm")
    return {
        "base": base,
        "image": build_modality_expert("image", base, root / "vision", seed=1),
        "audio": build_modality_expert("audio", base, root / "audio", seed=2, lora=True),
        "video": build_modality_expert("video", base, root / "video", seed=3),
    }
