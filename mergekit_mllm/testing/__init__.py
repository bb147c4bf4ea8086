"""Tiny seeded random checkpoints built offline (no Hub access).

Used by the tests, the benchmarks and ``mergekit-mllm demo``.

Every builder writes a real ``save_pretrained`` directory in well under a
second; experts are the base plus small seeded perturbations, like fine-tunes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

VOCAB = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"w{i}" for i in range(123)
]


def save_tokenizer(directory: Path, extra_tokens: Sequence[str] = ()) -> None:
    """A word-level fast tokenizer built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(VOCAB) + list(extra_tokens))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(directory)


def tiny_qwen2_config(vocab_size: int = 128, layers: int = 2):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def build_qwen2(directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny Qwen2ForCausalLM (an architecture stock mergekit knows)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(layers=layers))
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def perturb_checkpoint(
    source: Path,
    target: Path,
    *,
    seed: int,
    scale: float = 0.02,
    only: Optional[Sequence[str]] = None,
    low_rank: Optional[int] = None,
) -> Path:
    """Copy ``source`` to ``target`` with seeded changes to floating tensors.

    ``only``: substrings of tensor names to change (others stay bit-identical).
    ``low_rank``: rank of the change for 2-D tensors (a LoRA-like expert).
    """
    import shutil

    if Path(source).resolve() != Path(target).resolve():
        shutil.copytree(source, target, dirs_exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(target.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                continue
            if only is not None and not any(part in name for part in only):
                continue
            if low_rank and tensor.ndim == 2:
                a = torch.randn(tensor.shape[0], low_rank, generator=generator)
                b = torch.randn(low_rank, tensor.shape[1], generator=generator)
                delta = (a @ b) / low_rank**0.5
            else:
                delta = torch.randn(tensor.shape, generator=generator)
            tensors[name] = (tensor.float() + scale * delta).to(tensor.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return target


def build_family(root: Path, builder=build_qwen2, experts: int = 3, **perturb) -> Dict[str, object]:
    """A base and ``experts`` perturbed copies; returns their paths."""
    base = builder(root / "base")
    expert_paths: List[Path] = [
        perturb_checkpoint(base, root / f"expert{i}", seed=100 + i, **perturb) for i in range(experts)
    ]
    return {"base": base, "experts": expert_paths}


def state_dict(directory: Path) -> Dict[str, torch.Tensor]:
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def recipe_for(method: str, base: Path, experts: Sequence[Path], parameters: Optional[dict] = None, **extra) -> dict:
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(path)} for path in experts],
        "dtype": "float32",
    }
    if parameters:
        recipe["parameters"] = parameters
    recipe.update(extra)
    return recipe


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
