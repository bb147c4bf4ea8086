"""Helpers of the composition tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

# One item per modality: placeholders in the text, inputs for the processor.
PROMPTS = {"image": "w1 <image> w2", "audio": "w3 <audio> w4", "video": "w5 <video> w6"}


def modality_inputs(kind: str, seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    frame = lambda: Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))  # noqa: E731
    if kind == "image":
        return {"images": [frame()]}
    if kind == "audio":
        return {"audio": [rng.standard_normal(8000).astype("float32")]}
    return {"videos": [[frame(), frame()]]}


def compose_recipe(method: str, base: Path, experts, parameters=None, **compose) -> dict:
    recipe = {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
              "dtype": "float32", "compose": compose or True}
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def run_merge(recipe: dict, out: Path, **options) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    source = yaml.safe_dump(recipe, sort_keys=False)
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    mergekit_run_merge(config, str(out), options=MergeOptions(quiet=True, **options), config_source=source)
    return out


def load_composed(path: Path):
    import transformers

    import mergekit_mllm.compose  # noqa: F401  (registers mllm_compose with the Auto classes)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    return model.eval(), transformers.AutoProcessor.from_pretrained(path), info


def load_expert(path: Path):
    """A single-modality expert as a full model (a LoRA one merged by peft)."""
    import peft

    from mergekit_mllm.compose import ComposeForConditionalGeneration, ComposeProcessor
    from mergekit_mllm.lora.adapter import LoraAdapter, is_adapter_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_adapter_dir(path):
            base = Path(LoraAdapter(path).base_model_name_or_path)
            model = peft.PeftModel.from_pretrained(ComposeForConditionalGeneration.from_pretrained(base), path)
            model = model.merge_and_unload()
        else:
            model = ComposeForConditionalGeneration.from_pretrained(path)
    return model.eval(), ComposeProcessor.from_pretrained(path)


@torch.no_grad()
def logits(model, processor, kind: str) -> torch.Tensor:
    return model(**processor(PROMPTS[kind], **modality_inputs(kind))).logits
