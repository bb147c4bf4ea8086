"""A language model with one encoder and projector per modality (ModelCompose layout).

``ComposeForConditionalGeneration`` holds a causal LM (``language_model``) and,
per modality kind (``image``, ``audio``, ``video``), an encoder built from its
config with ``AutoModel`` (``encoders.<kind>``) and a two-layer MLP projector
into the LM's embedding space (``projectors.<kind>``). The same class is a
single-modality expert (one entry in ``config.modalities``) and a composition
of several: composing experts is merging their shared language model and
taking the union of their encoders and projectors.

Inputs follow transformers' names — ``pixel_values`` (B, 3, H, W) for images,
``input_features`` (B, mel, frames) for audio, ``pixel_values_videos``
(B, F, 3, H, W) for video. Each item replaces ``tokens_per_item`` consecutive
placeholder tokens of its modality in ``input_ids`` (the processor expands
them); placeholders are never looked up in the embedding table, so their ids
may lie beyond the LM's vocabulary.

Encoders: image/video use the patch tokens of ``last_hidden_state`` (the CLS
token dropped, like LLaVA); video averages them over frames; audio uses every
output frame (the paper's experts use BEATs + Q-Former and LanguageBind;
any encoder ``AutoModel`` can build with the same output fits).

Importing this module registers the classes with ``AutoConfig``, ``AutoModel``
and ``AutoModelForImageTextToText`` (model type ``mllm_compose``).

This file imports only torch and transformers.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "mllm_compose"
# modality kind -> the forward() argument carrying its inputs
MODALITY_INPUTS = {"image": "pixel_values", "audio": "input_features", "video": "pixel_values_videos"}
# modality kind -> how the encoder's last_hidden_state becomes tokens
FEATURE_SELECTION = {"image": "patches", "audio": "frames", "video": "patches_mean_over_frames"}


def _sub_config(value) -> Optional[PretrainedConfig]:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    from transformers import CONFIG_MAPPING

    value = dict(value)
    return CONFIG_MAPPING[value.pop("model_type")](**value)


class ComposeConfig(PretrainedConfig):
    """``text_config``: the language model; ``modalities``: kind →
    ``{"encoder": <encoder config dict>, "token": str, "token_id": int,
    "tokens_per_item": int}``."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, modalities: Optional[Dict[str, dict]] = None, **kwargs):
        self.text_config = _sub_config(text_config)
        self.modalities = {}
        for kind, spec in (modalities or {}).items():
            if kind not in MODALITY_INPUTS:
                raise ValueError(f"unknown modality {kind!r}; expected one of {', '.join(MODALITY_INPUTS)}")
            spec = dict(spec)
            encoder = spec["encoder"]
            spec["encoder"] = encoder.to_dict() if isinstance(encoder, PretrainedConfig) else dict(encoder)
            self.modalities[kind] = spec
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def encoder_config(self, kind: str) -> PretrainedConfig:
        return _sub_config(self.modalities[kind]["encoder"])


class ModalityProjector(nn.Module):
    """Encoder features → LM embeddings: Linear, GELU, Linear (LLaVA-1.5's MLP)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class ComposePreTrainedModel(PreTrainedModel):
    config_class = ComposeConfig
    config: ComposeConfig
    base_model_prefix = ""
    input_modalities = ("text", "image", "audio", "video")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]


class ComposeForConditionalGeneration(ComposePreTrainedModel, GenerationMixin):
    def __init__(self, config: ComposeConfig):
        super().__init__(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        hidden = config.text_config.hidden_size
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        for kind in config.modalities:
            encoder_config = config.encoder_config(kind)
            self.encoders[kind] = AutoModel.from_config(encoder_config)
            self.projectors[kind] = ModalityProjector(_encoder_width(encoder_config), hidden)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------ modalities

    def modality_features(self, kind: str, inputs: torch.Tensor) -> torch.Tensor:
        """(items, tokens_per_item, hidden) LM embeddings of one modality's inputs."""
        encoder = self.encoders[kind]
        dtype = next(encoder.parameters()).dtype
        if kind == "video":
            batch, frames = inputs.shape[:2]
            states = encoder(pixel_values=inputs.flatten(0, 1).to(dtype)).last_hidden_state[:, 1:]
            states = states.unflatten(0, (batch, frames)).mean(dim=1)
        elif kind == "image":
            states = encoder(pixel_values=inputs.to(dtype)).last_hidden_state[:, 1:]
        else:
            states = encoder(**{MODALITY_INPUTS[kind]: inputs.to(dtype)}).last_hidden_state
        return self.projectors[kind](states)

    def _embed(self, input_ids: torch.Tensor, modality_inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        placeholders = {kind: input_ids == spec["token_id"] for kind, spec in self.config.modalities.items()}
        any_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for mask in placeholders.values():
            any_placeholder |= mask
        # placeholder ids need not be in the vocabulary: never looked up
        embeds = self.get_input_embeddings()(input_ids.masked_fill(any_placeholder, 0))
        for kind, mask in placeholders.items():
            inputs = modality_inputs.get(kind)
            count = int(mask.sum())
            if inputs is None:
                if count:
                    raise ValueError(f"input_ids hold {count} {kind} placeholder tokens but no {MODALITY_INPUTS[kind]}")
                continue
            features = self.modality_features(kind, inputs)
            if features.shape[0] * features.shape[1] != count:
                raise ValueError(
                    f"{features.shape[0]} {kind} input(s) give {features.shape[0] * features.shape[1]} tokens, "
                    f"but input_ids hold {count} {kind} placeholders"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        modality_inputs = {
            kind: value
            for kind, value in (("image", pixel_values), ("audio", input_features), ("video", pixel_values_videos))
            if value is not None
        }
        unknown = sorted(set(modality_inputs) - set(self.config.modalities))
        if unknown:
            raise ValueError(f"this model has no encoder for {', '.join(unknown)} (it has: "
                             f"{', '.join(self.config.modalities) or 'none'})")
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids, modality_inputs)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


def _encoder_width(config: PretrainedConfig) -> int:
    for key in ("hidden_size", "d_model"):
        if getattr(config, key, None):
            return getattr(config, key)
    raise ValueError(f"cannot tell the output width of encoder config {type(config).__name__}")


def register() -> None:
    """Register with transformers' Auto classes (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, ComposeConfig)
    except ValueError:  # already registered
        return
    AutoModel.register(ComposeConfig, ComposeForConditionalGeneration)
    AutoModelForImageTextToText.register(ComposeConfig, ComposeForConditionalGeneration)


register()
