"""Adapters for models with a transformers processor: Qwen2-VL, Qwen2.5-VL, LLaVA,
InternVL (transformers-native ``-hf`` checkpoints) and our synthetic family."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from eval_suite.adapters.base import Adapter, AdapterError, Generation, Request


def _read_chat_template(directory) -> Optional[str]:
    import json
    from pathlib import Path

    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return None


def _image_only(processor_class):
    """A subclass of ``processor_class`` whose sub-processors are the image processor and tokenizer only.

    transformers validates every sub-processor's type, and the video processor
    base class is a torchvision-only dummy here; the subclass's narrower
    ``__init__`` signature is what ``ProcessorMixin`` reads its attribute list from.
    """
    import inspect

    if "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return processor_class

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=chat_template, **kwargs)

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "video_processor": None})


class ProcessorAdapter(Adapter):
    """``AutoProcessor`` + ``AutoModelForImageTextToText`` + the checkpoint's chat template."""

    name = "processor"
    #: content order of the user turn (image first, as every family's reference evaluation does)
    image_first = True

    def image_processor_kwargs(self) -> Dict[str, Any]:
        return {}

    def load_processor(self):
        """The checkpoint's processor with the PIL image backend and without a video processor.

        ``AutoProcessor`` also instantiates video processors, which need torchvision;
        evaluation is image-only, so the processor is assembled from its image
        processor, tokenizer and chat template instead.
        """
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        model_type = self.config.get("model_type")
        class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
        if class_name is None:
            raise AdapterError(f"{self.name}: transformers has no processor class for model_type {model_type!r}")
        processor_class = getattr(transformers, class_name)
        image_processor = AutoImageProcessor.from_pretrained(self.model_path, backend="pil", **self.image_processor_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        extra = {}
        processor_config = self.model_path / "processor_config.json"
        if processor_config.is_file():
            import json

            extra = {k: v for k, v in json.loads(processor_config.read_text()).items()
                     if k not in ("processor_class", "image_processor", "tokenizer", "video_processor", "chat_template")
                     and not isinstance(v, dict)}
        extra.update(self.processor_defaults(extra))
        chat_template = _read_chat_template(self.model_path) or getattr(tokenizer, "chat_template", None)
        return _image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=chat_template, **extra)

    def processor_defaults(self, found: Dict[str, Any]) -> Dict[str, Any]:
        """Processor arguments a checkpoint may omit (e.g. LLaVA's patch size), derived from its config."""
        return {}

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText

        try:
            self.processor = self.load_processor()
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.model_path, dtype=self.dtype, attn_implementation=self.attn_implementation,
            )
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise AdapterError(f"{self.name}: cannot load {self.model_path}: {exc}") from exc
        self.model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise AdapterError(f"{self.name}: the processor in {self.model_path} has no tokenizer")
        tokenizer.padding_side = "left"  # decoder-only batched generation
        self.tokenizer = tokenizer
        if getattr(self.processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None) is None:
            raise AdapterError(
                f"{self.name}: {self.model_path} has no chat template (copy chat_template.json from the "
                "instruct checkpoint into merged models; see PAPER.md pitfall 10)"
            )

    def messages(self, request: Request) -> List[Dict[str, Any]]:
        image = {"type": "image"}
        text = {"type": "text", "text": request.prompt}
        return [{"role": "user", "content": [image, text] if self.image_first else [text, image]}]

    def _inputs(self, requests: Sequence[Request]):
        texts = [self.processor.apply_chat_template(self.messages(r), add_generation_prompt=True, tokenize=False)
                 for r in requests]
        images = [r.image.convert("RGB") for r in requests]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(self.dtype)
        return inputs

    def _generate_batch(self, requests: Sequence[Request]) -> List[Generation]:
        inputs = self._inputs(requests)
        max_new_tokens = max(r.max_new_tokens for r in requests)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                temperature=None, top_p=None, top_k=None,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Generation(text.strip(), self._info(inputs, i)) for i, text in enumerate(texts)]

    def _info(self, inputs, index: int) -> Dict[str, Any]:
        return {}


class Qwen2VLAdapter(ProcessorAdapter):
    """Qwen2-VL: VLMEvalKit's pixel budget (min 256·28², max 1280·28²), fp16 on CUDA."""

    name = "qwen2_vl"
    prompt_style = "qwen2_vl"
    cuda_default_dtype = "float16"
    min_pixels = 256 * 28 * 28
    max_pixels = 1280 * 28 * 28

    def image_processor_kwargs(self) -> Dict[str, Any]:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: grounding answers are absolute pixels of the processed image, so each
    generation carries the processed ``input_width``/``input_height``."""

    name = "qwen2_5_vl"
    prompt_style = "qwen2_5_vl"
    cuda_default_dtype = "bfloat16"

    def _info(self, inputs, index: int) -> Dict[str, Any]:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return {}
        patch = getattr(self.processor.image_processor, "patch_size", 14)
        _, height, width = (int(v) for v in grid[index])
        return {"input_width": width * patch, "input_height": height * patch}


class LlavaAdapter(ProcessorAdapter):
    name = "llava"
    prompt_style = "llava"
    cuda_default_dtype = "float16"

    def processor_defaults(self, found: Dict[str, Any]) -> Dict[str, Any]:
        vision = self.config.get("vision_config", {})
        defaults = {
            "patch_size": vision.get("patch_size", 14),
            "vision_feature_select_strategy": self.config.get("vision_feature_select_strategy", "default"),
            # CLIP/SigLIP towers: one CLS token that the "default" strategy drops
            "num_additional_image_tokens": 1 if vision.get("model_type", "clip_vision_model") == "clip_vision_model" else 0,
        }
        return {k: v for k, v in defaults.items() if found.get(k) is None}


class InternVLAdapter(ProcessorAdapter):
    """transformers-native InternVL (``model_type: internvl``, the ``-hf`` checkpoints); bf16 on CUDA."""

    name = "internvl"
    prompt_style = "internvl"
    cuda_default_dtype = "bfloat16"


class SynthAdapter(LlavaAdapter):
    """The synthetic LLaVA family (``python -m eval_suite synth build``): bare questions."""

    name = "synth"
    prompt_style = "synth"
    cuda_default_dtype = "float32"
