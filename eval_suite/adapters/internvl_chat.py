"""InternVL2/2.5 remote-code checkpoints (``model_type: internvl_chat``), e.g. the paper's
``OpenGVLab/InternVL2_5-1B`` base and ``yongxianwei/InternVL2_5-1B_*`` experts.

Preprocessing follows InternVL's ``load_image`` (dynamic 448-px tiling with a
thumbnail, ImageNet normalisation), re-implemented with PIL and numpy so that
torchvision is not needed; generation goes through the checkpoint's own
``batch_chat``. Requires ``trust_remote_code`` (the checkpoint's Python files).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from eval_suite.adapters.base import Adapter, AdapterError, Generation, Request

IMAGENET_MEAN = (0.485, 0.456, 0.406)
# InternVL2.5's default system message (its "internvl2_5" conversation template)
INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
IMAGENET_STD = (0.229, 0.224, 0.225)


def _closest_aspect_ratio(aspect_ratio: float, ratios, width: int, height: int, image_size: int) -> Tuple[int, int]:
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        target = ratio[0] / ratio[1]
        diff = abs(aspect_ratio - target)
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def dynamic_preprocess(image, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = True):
    """InternVL's dynamic tiling: the grid (i, j) with i·j ≤ max_num closest to the aspect ratio."""
    width, height = image.size
    aspect_ratio = width / height
    ratios = sorted(
        {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
         if min_num <= i * j <= max_num},
        key=lambda r: r[0] * r[1],
    )
    cols, rows = _closest_aspect_ratio(aspect_ratio, ratios, width, height, image_size)
    resized = image.resize((image_size * cols, image_size * rows), resample=3)  # bicubic
    tiles = []
    for index in range(cols * rows):
        left = (index % cols) * image_size
        top = (index // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), resample=3))
    return tiles


def tiles_to_tensor(tiles, image_size: int = 448) -> torch.Tensor:
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    arrays = []
    for tile in tiles:
        array = np.asarray(tile.convert("RGB").resize((image_size, image_size), resample=3), dtype=np.float32) / 255.0
        arrays.append(((array - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


class InternVLChatAdapter(Adapter):
    name = "internvl_chat"
    prompt_style = "internvl"
    cuda_default_dtype = "bfloat16"  # InternVL's VLMEvalKit adapter is hard-wired to bf16
    max_num_tiles = 6

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.model = AutoModel.from_pretrained(
                self.model_path, dtype=self.dtype, trust_remote_code=True, attn_implementation=self.attn_implementation,
            )
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=True, use_fast=False)
            except (OSError, ValueError):  # checkpoints that ship only a fast tokenizer
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=True)
        except (OSError, ValueError, ImportError) as exc:
            raise AdapterError(f"internvl_chat: cannot load {self.model_path} with trust_remote_code: {exc}") from exc
        self.model.to(self.device).eval()
        vision = self.config.get("vision_config", {})
        self.image_size = int(self.config.get("force_image_size") or vision.get("image_size", 448))
        patch = int(vision.get("patch_size", 14))
        ratio = float(self.config.get("downsample_ratio", 0.5))
        self.num_image_token = int(getattr(self.model, "num_image_token", 0) or (self.image_size // patch) ** 2 * ratio ** 2)

    def _generate_batch(self, requests: Sequence[Request]) -> List[Generation]:
        pixel_values, num_patches = [], []
        for request in requests:
            tiles = dynamic_preprocess(request.image.convert("RGB"), max_num=self.max_num_tiles, image_size=self.image_size)
            pixel_values.append(tiles_to_tensor(tiles, self.image_size))
            num_patches.append(len(tiles))
        pixels = torch.cat(pixel_values).to(self.device, self.dtype)
        questions = ["<image>\n" + r.prompt for r in requests]
        config = {"max_new_tokens": max(r.max_new_tokens for r in requests), "do_sample": False}
        with torch.inference_mode():
            if hasattr(self.model, "batch_chat"):  # the checkpoint's own code path (VLMEvalKit uses it)
                answers = self.model.batch_chat(self.tokenizer, pixels, num_patches_list=num_patches,
                                                questions=questions, generation_config=config)
            else:
                answers = self._batch_chat(pixels, num_patches, questions, config)
        return [Generation(str(answer).strip()) for answer in answers]

    def _batch_chat(self, pixels, num_patches, questions, config) -> List[str]:
        """InternVL's ``batch_chat`` steps, for remote code that lacks it: the internvl2_5 (MPT)
        template, ``<img><IMG_CONTEXT>×n</img>`` in place of ``<image>``, left padding, greedy."""
        context = "<IMG_CONTEXT>"
        self.model.img_context_token_id = self.tokenizer.convert_tokens_to_ids(context)
        queries = []
        for question, patches in zip(questions, num_patches):
            query = (f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                     "<|im_start|>assistant\n")
            queries.append(query.replace("<image>", "<img>" + context * self.num_image_token * patches + "</img>", 1))
        self.tokenizer.padding_side = "left"
        inputs = self.tokenizer(queries, return_tensors="pt", padding=True).to(self.device)
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        output = self.model.generate(pixel_values=pixels, input_ids=inputs["input_ids"],
                                     attention_mask=inputs["attention_mask"], eos_token_id=eos,
                                     pad_token_id=self.tokenizer.pad_token_id, **config)
        prompt_length = inputs["input_ids"].shape[1]
        if output.shape[1] > prompt_length and torch.equal(output[:, :prompt_length], inputs["input_ids"]):
            output = output[:, prompt_length:]  # remote code built on input_ids returns the prompt too
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [text.split("<|im_end|>")[0].strip() for text in texts]
