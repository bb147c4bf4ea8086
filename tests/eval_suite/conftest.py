"""Fixtures for eval_suite tests: a scripted adapter and schema-faithful dataset files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import pytest
from PIL import Image

from eval_suite.adapters.base import Adapter, Generation, Request


def png_bytes(width: int = 32, height: int = 24, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


class ScriptedAdapter(Adapter):
    """An adapter that answers from a function of the prompt (no model); records requests."""

    name = "scripted"

    def __init__(self, answer: Callable[[Request], str], prompt_style: str = "generic", batch_size: int = 4):
        self.answer = answer
        self.prompt_style = prompt_style
        self.batch_size = batch_size
        self.progress = False
        self.requests: List[Request] = []
        self.batches: List[int] = []
        self.model_path = Path("scripted")
        self.device, self.dtype_name, self.attn_implementation = "cpu", "float32", "eager"

    def _load(self):  # pragma: no cover - nothing to load
        pass

    def _generate_batch(self, requests: Sequence[Request]):
        self.requests.extend(requests)
        self.batches.append(len(requests))
        return [Generation(self.answer(r), {"input_width": r.image.width, "input_height": r.image.height}) for r in requests]


@pytest.fixture
def scripted_adapter():
    return ScriptedAdapter


def write_parquet(path: Path, rows: List[Dict], image_columns: Sequence[str] = ("image",)) -> Path:
    """Rows → a parquet file whose image columns use the ``datasets`` Image feature, like the Hub's."""
    import datasets

    features = {}
    for key, value in rows[0].items():
        if key in image_columns:
            features[key] = datasets.Image()
    dataset = datasets.Dataset.from_list(rows)
    for key in features:
        dataset = dataset.cast_column(key, datasets.Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


@pytest.fixture
def parquet_writer():
    return write_parquet


@pytest.fixture
def png():
    return png_bytes
