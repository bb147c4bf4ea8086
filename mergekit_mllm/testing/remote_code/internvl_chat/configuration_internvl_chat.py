"""Minimal stand-in for OpenGVLab's remote-code InternVL2.5 configuration.

Same config layout as the released checkpoints (``vision_config``,
``llm_config``, ``model_type: internvl_chat``) at a tiny size, for offline
tests of merging the authors' checkpoint layout.
"""

from transformers import PretrainedConfig, Qwen2Config


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 image_size=28, patch_size=14, num_channels=3, layer_norm_eps=1e-6, qkv_bias=True, **kwargs):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        super().__init__(**kwargs)


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": Qwen2Config}

    def __init__(self, vision_config=None, llm_config=None, downsample_ratio=0.5, template="internvl2_5", **kwargs):
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = InternVisionConfig(**(vision_config or {}))
        if isinstance(llm_config, dict) or llm_config is None:
            llm_config = dict(llm_config or {})
            llm_config.pop("model_type", None)
            llm_config = Qwen2Config(**llm_config)
        self.vision_config = vision_config
        self.llm_config = llm_config
        self.downsample_ratio = downsample_ratio
        self.template = template
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.llm_config

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output
