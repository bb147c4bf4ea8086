"""Minimal stand-in for OpenGVLab's remote-code ``InternVLChatModel``.

Tensor names follow the released InternVL2.5 checkpoints: ``vision_model.*``
(InternViT with class/position embeddings and layer scales), ``mlp1.{0,1,3}``
(LayerNorm, Linear, GELU, Linear) and ``language_model.{model,lm_head}.*``.
"""

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM

from .configuration_internvl_chat import InternVisionConfig, InternVLChatConfig


class InternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (c // self.num_heads) ** 0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(torch.ones(config.hidden_size))
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, config.hidden_size))

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class InternVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values):
        return self.encoder(self.embeddings(pixel_values))


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    _no_split_modules = ["InternVisionEncoderLayer", "Qwen2DecoderLayer"]

    def __init__(self, config: InternVLChatConfig):
        super().__init__(config)
        vit_hidden = config.vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        scale = int(1 / config.downsample_ratio) ** 2
        self.vision_model = InternVisionModel(config.vision_config)
        self.language_model = Qwen2ForCausalLM(config.llm_config)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_hidden * scale),
            nn.Linear(vit_hidden * scale, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        self.post_init()

    def extract_feature(self, pixel_values):
        features = self.vision_model(pixel_values)[:, 1:, :]
        b, n, c = features.shape
        side = int(n**0.5)
        features = features.reshape(b, side // 2, 2, side // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return self.mlp1(features.reshape(b, (side // 2) ** 2, 4 * c))

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            embeds = torch.cat([self.extract_feature(pixel_values).to(embeds.dtype), embeds], dim=1)
            if attention_mask is not None:
                pad = attention_mask.new_ones(attention_mask.shape[0], embeds.shape[1] - attention_mask.shape[1])
                attention_mask = torch.cat([pad, attention_mask], dim=1)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        return self.language_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
