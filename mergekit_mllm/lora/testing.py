"""Tiny seeded LoRA experts built offline with peft (tests, demos).

An expert is a real ``PeftModel.save_pretrained`` directory over a tiny base
from :mod:`mergekit_mllm.testing`; its factors are seeded and small (like a
short fine-tune). ``materialise`` also writes what mergekit's ``base+lora``
syntax would: peft's ``merge_and_unload`` of it, as a full checkpoint — the
reference the tests compare against, never used by the plugin itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json")


def load_base(base_dir, trust_remote_code: bool = False):
    import transformers

    config = transformers.AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    model_class = getattr(transformers, config.architectures[0], None)
    if model_class is None:
        return transformers.AutoModel.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    return model_class.from_pretrained(base_dir)


def build_lora_expert(
    base_dir,
    out_dir,
    *,
    seed: int,
    scale: float = 0.05,
    materialise: Optional[Path] = None,
    **lora_config,
) -> Path:
    """A peft LoRA adapter over ``base_dir`` with seeded factors.

    ``lora_config``: ``peft.LoraConfig`` arguments (r, lora_alpha,
    target_modules, rank_pattern, alpha_pattern, use_rslora, modules_to_save,
    bias, …). Every trainable tensor is drawn from N(0, scale²) (B too, so the
    delta is non-zero).
    """
    import peft

    torch.manual_seed(seed)
    model = load_base(base_dir)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(out_dir)
    if materialise is not None:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(materialise)
        for name in SIDE_FILES:
            if (Path(base_dir) / name).is_file():
                shutil.copyfile(Path(base_dir) / name, Path(materialise) / name)
    return Path(out_dir)
