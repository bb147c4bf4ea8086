"""Model adapters and detection from a checkpoint's ``config.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Type

from eval_suite.adapters.base import Adapter, AdapterError, Generation, Request, read_config
from eval_suite.adapters.hf import (
    InternVLAdapter,
    LlavaAdapter,
    ProcessorAdapter,
    Qwen2_5_VLAdapter,
    Qwen2VLAdapter,
    SynthAdapter,
)
from eval_suite.adapters.internvl_chat import InternVLChatAdapter

ADAPTERS: Dict[str, Type[Adapter]] = {
    cls.name: cls
    for cls in (Qwen2VLAdapter, Qwen2_5_VLAdapter, LlavaAdapter, InternVLAdapter, InternVLChatAdapter, SynthAdapter)
}
MODEL_TYPES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "llava": "llava",
    "internvl": "internvl",
    "internvl_chat": "internvl_chat",
}


def detect_adapter(model_path) -> str:
    """Adapter name for a checkpoint directory (from ``model_type`` and our synthetic-family marker)."""
    from eval_suite.synth.family import CONFIG_MARKER

    config = read_config(Path(model_path))
    if CONFIG_MARKER in config:
        return "synth"
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise AdapterError(
        f"{model_path}: no adapter for model_type {model_type!r}; known: {', '.join(sorted(MODEL_TYPES))} "
        f"(pass --adapter to force one of {', '.join(sorted(ADAPTERS))})"
    )


def load_adapter(model_path, adapter: Optional[str] = None, **kwargs) -> Adapter:
    if not Path(model_path).is_dir():
        raise AdapterError(f"model directory {model_path} does not exist")
    name = adapter or detect_adapter(model_path)
    if name not in ADAPTERS:
        raise AdapterError(f"unknown adapter {name!r}; choose from {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](model_path, **kwargs)


__all__ = [
    "ADAPTERS", "Adapter", "AdapterError", "Generation", "ProcessorAdapter", "Request", "detect_adapter", "load_adapter",
]
