"""Model adapters: batched greedy generation through transformers, on CPU or CUDA.

An adapter turns :class:`Request` s (an image and an already-styled prompt)
into :class:`Generation` s. Decoding is greedy (``do_sample=False``), attention
is ``eager`` by default (the paper's setting) and the dtype is recorded in the
results.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch


class AdapterError(RuntimeError):
    """The model cannot be loaded or driven; the message says which and why."""


@dataclass
class Request:
    prompt: str
    image: Any  # PIL.Image.Image
    max_new_tokens: int = 32


@dataclass
class Generation:
    text: str
    info: Dict[str, Any] = field(default_factory=dict)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapterError(f"device {device!r} requested but CUDA is not available")
    return device


def read_config(model_path: Path) -> Dict[str, Any]:
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise AdapterError(f"{model_path}: no config.json (is this a transformers model directory?)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_file}: not valid JSON ({exc})") from exc


class Adapter(ABC):
    """Loads a model once; :meth:`generate` runs batched greedy decoding with a progress bar."""

    name: str = "base"
    #: which prompt conventions tasks should use for this model family
    prompt_style: str = "generic"
    #: dtype used on CUDA when ``dtype="auto"`` and the checkpoint declares none (the paper's choice)
    cuda_default_dtype: str = "float16"

    def __init__(self, model_path, *, device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                 attn_implementation: str = "eager", progress: bool = True):
        self.model_path = Path(model_path)
        if not self.model_path.is_dir():
            raise AdapterError(
                f"model directory {model_path} does not exist; for a Hub model download it first "
                "(e.g. `hf download OWNER/NAME --local-dir DIR`) and pass the directory"
            )
        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        self.attn_implementation = attn_implementation
        self.progress = progress
        self.config = read_config(self.model_path)
        self.dtype_name = self._resolve_dtype(dtype)
        self.dtype = DTYPES[self.dtype_name]
        self._load()

    # -- hooks ------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the model and its processor."""

    @abstractmethod
    def _generate_batch(self, requests: Sequence[Request]) -> List[Generation]:
        """Greedy generation for one batch."""

    # -- public -----------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        return {
            "path": str(self.model_path.resolve()),
            "name": self.model_path.resolve().name,
            "dtype": self.dtype_name,
            "attn_implementation": self.attn_implementation,
            "device": self.device,
            "adapter": self.name,
            "prompt_style": self.prompt_style,
            "decoding": "greedy",
            "batch_size": self.batch_size,
        }

    def generate(self, requests: Sequence[Request], desc: str = "generate") -> List[Generation]:
        from tqdm.auto import tqdm

        # Sort by prompt length so batches pad little; restore the order afterwards.
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
        bar = tqdm(total=len(requests), desc=desc, unit="item", disable=not self.progress, leave=False)
        results: Dict[int, Generation] = {}
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            batch = [requests[i] for i in indices]
            generations = self._generate_batch(batch)
            if len(generations) != len(batch):
                raise AdapterError(f"{self.name}: got {len(generations)} generations for {len(batch)} requests")
            results.update(zip(indices, generations))
            bar.update(len(batch))
        bar.close()
        return [results[i] for i in range(len(requests))]

    # -- helpers ----------------------------------------------------------
    def _resolve_dtype(self, dtype: str) -> str:
        if dtype != "auto":
            if dtype not in DTYPES:
                raise AdapterError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
            return dtype
        if self.device == "cpu":
            return "float32"
        declared = self.config.get("torch_dtype") or self.config.get("dtype")
        if declared in ("float16", "bfloat16"):
            return declared
        return self.cuda_default_dtype
