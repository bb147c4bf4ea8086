"""Constants and helpers shared by the hub tests (fixtures live in conftest.py).

A uniquely named module: ``from conftest import ...`` would be ambiguous with
tests/conftest.py on sys.path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional

# Distinctive fake tokens, so that "the token never leaks" can be grepped for.
TOKEN = "hf_TestOnlyTokenAlice7f3c9e21b4d8a6"
OTHER_TOKEN = "hf_TestOnlyTokenMallory5e8d2c1f0a9b"
USER = "alice"

# Paper-style names (PAPER.md §2.1): the report names Hub models, so the card
# can list them in base_model.
BASE_ID = "Qwen/Qwen2-VL-7B"
EXPERT_IDS = ["yongxianwei/Qwen2-VL-7B-OCR", "yongxianwei/Qwen2-VL-7B-Chart"]


def tiny_qwen2_vl(directory: Path, *, seed: int = 0, max_shard_size: str = "20KB") -> Path:
    """A tiny Qwen2-VL checkpoint written in many shards (some above the multipart threshold)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, in_channels=3, temporal_patch_size=2),
        vocab_size=128, hidden_size=32, image_token_id=120, video_token_id=121,
        vision_start_token_id=122, vision_end_token_id=123,
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


RECIPE_TEXT = f"""\
merge_method: optmerge
base_model: {BASE_ID}
models:
  - model: {EXPERT_IDS[0]}
  - model: {EXPERT_IDS[1]}
parameters:
  lambda: 1.0
dtype: float32
"""

REPORT = {
    "merge_method": "optmerge",
    "method_pretty_name": "OptMerge",
    "method_url": "https://arxiv.org/abs/2505.19892",
    "base_model": BASE_ID,
    "models": EXPERT_IDS,
    "parameters": {"lambda": 1.0, "rank_ratio": 0.2},
    "policies": {"vision_tower": "base", "projector": "base", "language_model": "merge",
                 "embeddings": "base", "norms": "base", "biases": "base"},
    "preset": "optmerge_paper",
    "model_type": "qwen2_vl",
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "versions": {"mergekit_mllm": "0.1.0", "mergekit": "0.1.5", "transformers": "5.23.0", "torch": "2.13.0"},
}


TASKS = {
    "synth_chart": ("relaxed_accuracy", "chart"),
    "synth_ocr": ("exact_match", "ocr"),
    "synth_vqa": ("vqa_accuracy", "vqa"),
}


def results_payload(model_path: Optional[str], name: str, scores: Dict[str, float], *, prompt_version="synth-v1") -> dict:
    return {
        "suite": "eval_suite",
        "suite_version": "0.1.0",
        "created": "2026-11-23T12:00:00Z",
        "model": {"path": model_path, "name": name, "dtype": "float32", "attn_implementation": "eager",
                  "device": "cpu", "adapter": "qwen2_vl"},
        "tasks": {
            task: {"score": score, "metric": TASKS[task][0], "num_items": 500, "parse_failures": 1,
                   "dataset_id": f"eval_suite/{task}", "dataset_revision": "v1", "split": "test",
                   "prompt_version": prompt_version, "task_type": "visual-question-answering",
                   "capability": TASKS[task][1]}
            for task, score in scores.items()
        },
    }


def write_results(path: Path, model_path: Optional[str], name: str, scores: Dict[str, float], **kwargs) -> Path:
    path.write_text(json.dumps(results_payload(model_path, name, scores, **kwargs), indent=1))
    return path


def folder_state(folder: Path) -> Dict[str, tuple]:
    """Content hash, size, mtime and mode of every file: 'untouched' means equal states."""
    state = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[path.relative_to(folder).as_posix()] = (digest, stat.st_size, stat.st_mtime_ns, stat.st_mode)
    return state


def files_containing(root: Path, needle: str):
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def subprocess_env(hub_endpoint: str, home: Path, token: Optional[str] = TOKEN) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub_endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token:
        env["HF_TOKEN"] = token
    return env
