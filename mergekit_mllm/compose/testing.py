"""Tiny seeded single-modality experts over one shared LLM (ModelCompose layout).

``build_compose_base`` writes the shared language model (a tiny Llama, the
stand-in for Vicuna-7B) with a word-level tokenizer; ``build_modality_expert``
writes an expert for ``image`` (CLIP-like ViT), ``audio`` (Whisper-like
encoder) or ``video`` (per-frame ViT) whose language model is the base plus
a seeded fine-tune — full (every LLM tensor changed) or LoRA (a peft adapter
over the expert's own base: the shared LLM plus its encoder and projector,
the projector trained whole through ``modules_to_save``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
TOKENS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
LLM_LINEAR = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VIT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)


def build_compose_base(directory, seed: int = 0) -> Path:
    """The shared LLM: a tiny LlamaForCausalLM and its tokenizer."""
    import transformers

    from mergekit_mllm.testing import save_tokenizer

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).save_pretrained(directory)
    save_tokenizer(Path(directory))
    return Path(directory)


def modality_parts(kind: str) -> Tuple[object, object, int]:
    """(encoder config, processor, tokens per item) of one modality."""
    import transformers as T

    if kind in ("image", "video"):
        processor = T.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return T.CLIPVisionConfig(**VIT), processor, (VIT["image_size"] // VIT["patch_size"]) ** 2
    if kind == "audio":
        encoder = T.Qwen2AudioEncoderConfig(d_model=16, encoder_layers=2, encoder_attention_heads=4,
                                            encoder_ffn_dim=32, num_mel_bins=16, max_source_positions=50)
        # 1 s of audio: 100 mel frames → 50 after the strided conv → 25 after pooling
        return encoder, T.WhisperFeatureExtractor(feature_size=16, chunk_length=1), 25
    raise ValueError(f"unknown modality {kind!r}")


def _single_modality_model(kind: str, base_dir: Path, seed: int):
    import transformers

    from mergekit_mllm.compose.modeling import ComposeConfig, ComposeForConditionalGeneration
    from mergekit_mllm.compose.processing import ComposeProcessor

    encoder, sub_processor, tokens = modality_parts(kind)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [TOKENS[kind]]})
    token_id = tokenizer.convert_tokens_to_ids(TOKENS[kind])
    text_config = transformers.AutoConfig.from_pretrained(base_dir)
    spec = {"encoder": encoder, "token": TOKENS[kind], "token_id": token_id, "tokens_per_item": tokens}
    torch.manual_seed(seed)
    model = ComposeForConditionalGeneration(
        ComposeConfig(text_config=text_config.to_dict(), modalities={kind: spec},
                      architectures=["ComposeForConditionalGeneration"])
    )
    language_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model.language_model.load_state_dict(language_model.state_dict())
    return model, ComposeProcessor(tokenizer, {kind: sub_processor}, {kind: spec})


def build_modality_expert(kind: str, base_dir, directory, *, seed: int, lora: bool = False,
                          scale: float = 0.02, rank: int = 4) -> Path:
    """A single-modality expert over the shared LLM at ``base_dir``.

    Full: ``directory`` is a complete checkpoint whose LLM tensors all moved.
    LoRA: ``directory`` is a peft adapter (LoRA on the LLM's linears, the
    projector saved whole) over ``<directory>_base``, the expert's own base.
    """
    import peft

    base_dir, directory = Path(base_dir), Path(directory)
    model, processor = _single_modality_model(kind, base_dir, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if not lora:
        with torch.no_grad():
            for parameter in model.language_model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return directory
    own_base = directory.parent / f"{directory.name}_base"
    model.save_pretrained(own_base)
    processor.save_pretrained(own_base)
    model = type(model).from_pretrained(own_base)  # so the adapter records its base path
    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=LLM_LINEAR, modules_to_save=[f"projectors.{kind}"]))
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
