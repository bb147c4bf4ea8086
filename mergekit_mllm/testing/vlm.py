"""Tiny seeded checkpoints of every multimodal family we support.

Each family builds a real transformers model at toy size (in well under a
second), saves it with ``save_pretrained`` next to a locally built tokenizer,
a PIL-based image processor (or audio feature extractor) and a chat template.
``layout="new"`` writes the tensors under transformers' in-memory names
(``model.language_model.*``) instead of the legacy names transformers writes
by default, reproducing the two key layouts found on the Hub.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

TEXT = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    head_dim=8,
    tie_word_embeddings=False,
)
VIT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)

# Special tokens the processors of the families below look up.
SPECIAL_TOKENS = [
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<image>", "<video>",
    "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<start_of_image>", "<end_of_image>",
    "<image_soft_token>", "<fake_token_around_image>", "<global-img>", "<IMG_CONTEXT>",
    "<img>", "</img>", "<ref>", "</ref>", "<box>", "</box>",
]
IMAGE_TOKEN_ID = 250
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}<image>{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def save_vlm_tokenizer(directory: Path, chat_template: Optional[str] = CHAT_TEMPLATE) -> None:
    """A 256-entry word-level tokenizer whose ids match the tiny configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(256 - len(base) - len(SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate(base + words + SPECIAL_TOKENS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)


def _image_processor(name: str, **kwargs):
    import transformers

    return getattr(transformers, name + "Pil", getattr(transformers, name))(**kwargs)


@dataclass(frozen=True)
class VlmFamily:
    name: str
    build: Callable[[], torch.nn.Module]
    processor: Optional[Callable[[], object]] = None
    trust_remote_code: bool = False
    # transformers' in-memory (new) layout: prefix renames from the legacy layout
    new_layout: Dict[str, str] = field(default_factory=dict)

    def save(self, directory: Path, *, seed: int = 0, layout: str = "legacy", chat_template: Optional[str] = CHAT_TEMPLATE) -> Path:
        directory = Path(directory)
        torch.manual_seed(seed)
        model = self.build()
        model.save_pretrained(directory)
        if self.trust_remote_code:
            _install_remote_code(directory)
        save_vlm_tokenizer(directory, chat_template)
        if self.processor is not None:
            self.processor().save_pretrained(directory)
        if chat_template:
            (directory / "chat_template.jinja").write_text(chat_template)
        if layout == "new":
            rename_tensors(directory, self.new_layout)
        elif layout != "legacy":
            raise ValueError(f"unknown layout {layout!r}")
        return directory


def rename_tensors(directory: Path, prefixes: Dict[str, str]) -> None:
    """Rewrite a checkpoint's tensor names by prefix (first match wins)."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(Path(directory).glob("*.safetensors")):
        renamed = {}
        for name, tensor in load_file(shard).items():
            for old, new in prefixes.items():
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            renamed[name] = tensor
        save_file(renamed, shard, metadata={"format": "pt"})
    index = Path(directory) / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        mapping = {}
        for name, file in data["weight_map"].items():
            for old, new in prefixes.items():
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            mapping[name] = file
        data["weight_map"] = mapping
        index.write_text(json.dumps(data, indent=2))


def _install_remote_code(directory: Path) -> None:
    package = resources.files("mergekit_mllm.testing.remote_code.internvl_chat")
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py"):
        shutil.copyfile(package / name, Path(directory) / name)
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    }
    config_path.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------- builders


def _qwen2_vl():
    import transformers as T

    return T.Qwen2VLForConditionalGeneration(
        T.Qwen2VLConfig(
            text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=IMAGE_TOKEN_ID, video_token_id=IMAGE_TOKEN_ID + 1,
        )
    )


def _qwen2_5_vl():
    import transformers as T

    return T.Qwen2_5_VLForConditionalGeneration(
        T.Qwen2_5_VLConfig(
            text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                               fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2),
            image_token_id=IMAGE_TOKEN_ID, video_token_id=IMAGE_TOKEN_ID + 1,
        )
    )


def _qwen3_vl():
    import transformers as T

    return T.Qwen3VLForConditionalGeneration(
        T.Qwen3VLConfig(
            text_config=dict(TEXT, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                 "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                               deepstack_visual_indexes=[1], patch_size=16, spatial_merge_size=2,
                               num_position_embeddings=64),
            image_token_id=IMAGE_TOKEN_ID, video_token_id=IMAGE_TOKEN_ID + 1,
        )
    )


def _llava():
    import transformers as T

    return T.LlavaForConditionalGeneration(
        T.LlavaConfig(text_config=T.LlamaConfig(**TEXT),
                      vision_config=T.CLIPVisionConfig(**VIT, image_size=28, patch_size=14, projection_dim=32),
                      image_token_index=IMAGE_TOKEN_ID)
    )


def _llava_onevision():
    import transformers as T

    return T.LlavaOnevisionForConditionalGeneration(
        T.LlavaOnevisionConfig(text_config=T.Qwen2Config(**TEXT),
                               vision_config=T.SiglipVisionConfig(**VIT, image_size=28, patch_size=14),
                               image_token_index=IMAGE_TOKEN_ID, video_token_index=IMAGE_TOKEN_ID + 1)
    )


def _internvl_hf():
    import transformers as T

    return T.InternVLForConditionalGeneration(
        T.InternVLConfig(text_config=T.Qwen2Config(**TEXT), vision_config=dict(VIT, image_size=28, patch_size=14),
                         image_token_id=IMAGE_TOKEN_ID)
    )


def _internvl_chat():
    import importlib

    config_module = importlib.import_module(
        "mergekit_mllm.testing.remote_code.internvl_chat.configuration_internvl_chat"
    )
    model_module = importlib.import_module("mergekit_mllm.testing.remote_code.internvl_chat.modeling_internvl_chat")
    config = config_module.InternVLChatConfig(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14),
        llm_config=dict(TEXT, architectures=["Qwen2ForCausalLM"]),
        architectures=["InternVLChatModel"],
    )
    return model_module.InternVLChatModel(config)


def _idefics3():
    import transformers as T

    return T.Idefics3ForConditionalGeneration(
        T.Idefics3Config(text_config=T.LlamaConfig(**TEXT), vision_config=dict(VIT, image_size=28, patch_size=14),
                         image_token_id=IMAGE_TOKEN_ID, scale_factor=2)
    )


def _smolvlm():
    import transformers as T

    return T.SmolVLMForConditionalGeneration(
        T.SmolVLMConfig(text_config=T.LlamaConfig(**TEXT), vision_config=dict(VIT, image_size=28, patch_size=14),
                        image_token_id=IMAGE_TOKEN_ID, scale_factor=2)
    )


def _gemma3():
    import transformers as T

    text = dict(TEXT, tie_word_embeddings=True)
    return T.Gemma3ForConditionalGeneration(
        T.Gemma3Config(text_config=T.Gemma3TextConfig(**text),
                       vision_config=T.SiglipVisionConfig(**VIT, image_size=28, patch_size=14),
                       mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN_ID,
                       boi_token_index=IMAGE_TOKEN_ID + 1, eoi_token_index=IMAGE_TOKEN_ID + 2)
    )


def _qwen2_audio():
    import transformers as T

    return T.Qwen2AudioForConditionalGeneration(
        T.Qwen2AudioConfig(text_config=T.Qwen2Config(**TEXT),
                           audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                             encoder_ffn_dim=48, num_mel_bins=16, max_source_positions=32),
                           audio_token_index=IMAGE_TOKEN_ID)
    )


_LEGACY_LLM = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
               "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}

FAMILIES: Dict[str, VlmFamily] = {
    family.name: family
    for family in (
        VlmFamily("qwen2_vl", _qwen2_vl, lambda: _image_processor("Qwen2VLImageProcessor"),
                  new_layout={"model.": "model.language_model.", "visual.": "model.visual."}),
        VlmFamily("qwen2_5_vl", _qwen2_5_vl, lambda: _image_processor("Qwen2VLImageProcessor"),
                  new_layout={"model.": "model.language_model.", "visual.": "model.visual."}),
        VlmFamily("qwen3_vl", _qwen3_vl, lambda: _image_processor("Qwen2VLImageProcessor", patch_size=16)),
        VlmFamily("internvl_chat", _internvl_chat, lambda: _image_processor("CLIPImageProcessor"),
                  trust_remote_code=True),
        VlmFamily("internvl", _internvl_hf, lambda: _image_processor("GotOcr2ImageProcessor"),
                  new_layout=_LEGACY_LLM),
        VlmFamily("llava", _llava, lambda: _image_processor("CLIPImageProcessor"), new_layout=_LEGACY_LLM),
        VlmFamily("llava_onevision", _llava_onevision, lambda: _image_processor("LlavaOnevisionImageProcessor"),
                  new_layout=dict(_LEGACY_LLM, **{"image_newline": "model.image_newline"})),
        VlmFamily("idefics3", _idefics3, lambda: _image_processor("Idefics3ImageProcessor")),
        VlmFamily("smolvlm", _smolvlm, lambda: _image_processor("Idefics3ImageProcessor")),
        VlmFamily("gemma3", _gemma3, lambda: _image_processor("Gemma3ImageProcessor"), new_layout=_LEGACY_LLM),
        VlmFamily("qwen2_audio", _qwen2_audio,
                  lambda: __import__("transformers").WhisperFeatureExtractor(feature_size=16),
                  new_layout={"audio_tower.": "model.audio_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
                              "language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head."}),
    )
}


def build_vlm(family: str, directory: Path, *, seed: int = 0, layout: str = "legacy", **kwargs) -> Path:
    return FAMILIES[family].save(Path(directory), seed=seed, layout=layout, **kwargs)


def build_vlm_family(
    family: str,
    root: Path,
    *,
    experts: int = 2,
    layout: str = "legacy",
    scale: float = 0.02,
    only: Optional[Sequence[str]] = None,
) -> Dict[str, object]:
    """A tiny base of ``family`` and perturbed experts (all tensors change)."""
    from mergekit_mllm.testing import perturb_checkpoint

    base = build_vlm(family, Path(root) / "base", layout=layout)
    expert_paths = [
        perturb_checkpoint(base, Path(root) / f"expert{i}", seed=200 + i, scale=scale, only=only)
        for i in range(experts)
    ]
    return {"base": base, "experts": expert_paths}
