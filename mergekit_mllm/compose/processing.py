"""One processor for every modality of a composed model.

``ComposeProcessor`` holds the tokenizer and, per modality kind, the expert's
own processor (an image processor for ``image`` and ``video`` frames, a
feature extractor for ``audio``). Called with text containing one placeholder
token per item (``<image>``, ``<audio>``, ``<video>``), it expands each into
the encoder's ``tokens_per_item`` placeholders and returns ``input_ids``,
``attention_mask`` and the modality inputs under the model's argument names.

Saved as the tokenizer files plus ``mllm_compose_processor.json``; registered
with ``AutoProcessor`` for the ``mllm_compose`` model type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

PROCESSOR_FILE = "mllm_compose_processor.json"


def _sub_processor(class_name: str, config: dict):
    import transformers

    return getattr(transformers, class_name).from_dict(dict(config))


class ComposeProcessor:
    def __init__(self, tokenizer, processors: Dict[str, Any], modalities: Dict[str, dict]):
        missing = sorted(set(modalities) - set(processors))
        if missing:
            raise ValueError(f"no processor for modality {', '.join(missing)}")
        self.tokenizer = tokenizer
        self.processors = dict(processors)
        # kind -> {"token", "tokens_per_item"} (token_id comes from the tokenizer)
        self.modalities = {kind: {"token": spec["token"], "tokens_per_item": int(spec["tokens_per_item"])}
                           for kind, spec in modalities.items()}

    def token_id(self, kind: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.modalities[kind]["token"])

    def _expand(self, text: str, counts: Dict[str, int]) -> str:
        for kind, spec in self.modalities.items():
            token = spec["token"]
            counts[kind] = counts.get(kind, 0) + text.count(token)
            text = text.replace(token, token * spec["tokens_per_item"])
        return text

    def __call__(
        self,
        text,
        images: Optional[Sequence] = None,
        audio: Optional[Sequence] = None,
        videos: Optional[Sequence[Sequence]] = None,
        *,
        sampling_rate: Optional[int] = None,
        return_tensors: str = "pt",
        padding: bool = True,
    ):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        counts: Dict[str, int] = {}
        expanded = [self._expand(t, counts) for t in texts]
        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, padding=padding))
        given = {"image": images, "audio": audio, "video": videos}
        for kind, items in given.items():
            number = 0 if items is None else len(items)
            if number != counts.get(kind, 0):
                raise ValueError(f"the text has {counts.get(kind, 0)} {kind} placeholder(s) but {number} {kind} input(s)")
            if not number:
                continue
            if kind not in self.processors:
                raise ValueError(f"this processor has no {kind} modality")
            processor = self.processors[kind]
            if kind == "image":
                data["pixel_values"] = processor(list(items), return_tensors="pt")["pixel_values"]
            elif kind == "audio":
                rate = sampling_rate or getattr(processor, "sampling_rate", None)
                data["input_features"] = processor(list(items), sampling_rate=rate, return_tensors="pt")["input_features"]
            else:
                frames = [len(video) for video in items]
                if len(set(frames)) != 1:
                    raise ValueError(f"videos of a batch must have the same number of frames; got {frames}")
                pixels = processor([frame for video in items for frame in video], return_tensors="pt")["pixel_values"]
                data["pixel_values_videos"] = pixels.unflatten(0, (len(items), frames[0]))
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return {
            "processor_class": type(self).__name__,
            "modalities": {
                kind: dict(spec, processor_class=type(self.processors[kind]).__name__,
                           processor_config=self.processors[kind].to_dict())
                for kind, spec in self.modalities.items()
            },
        }

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "ComposeProcessor":
        from transformers import AutoTokenizer

        data = json.loads((Path(directory) / PROCESSOR_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(directory)
        processors = {kind: _sub_processor(spec["processor_class"], spec["processor_config"])
                      for kind, spec in data["modalities"].items()}
        return cls(tokenizer, processors, data["modalities"])

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def register() -> None:
    from transformers import AutoProcessor

    from mergekit_mllm.compose.modeling import ComposeConfig

    try:
        AutoProcessor.register(ComposeConfig, ComposeProcessor)
    except ValueError:  # already registered
        pass


register()
