"""Task abstraction: items, prompts per model family, per-item scoring, aggregation."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from PIL import Image

#: VLMEvalKit's Qwen2-VL suffix, used on all seven VLMEvalKit columns (PAPER.md §1.4)
QWEN_SUFFIX = "\nPlease try to answer the question with short words or phrases if possible."
#: VLMEvalKit's InternVL suffix on the VQA, chart and OCR sets; also LLaVA-1.5's evaluation suffix
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."


class ImageLoadError(RuntimeError):
    """An item's image is missing or cannot be decoded."""


class TaskError(RuntimeError):
    """A task cannot be loaded (unknown name, missing dataset, bad local file); the message says which."""


@dataclass
class EvalItem:
    id: str
    question: str
    answers: List[str]
    image: Any = None  # a PIL image, encoded bytes, a dict from ``datasets`` or a zero-arg callable
    meta: Dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        source = self.image
        try:
            if callable(source):
                source = source()
            if isinstance(source, Image.Image):
                image = source
            elif isinstance(source, dict) and (source.get("bytes") or source.get("path")):
                image = Image.open(io.BytesIO(source["bytes"])) if source.get("bytes") else Image.open(source["path"])
            elif isinstance(source, (bytes, bytearray)):
                image = Image.open(io.BytesIO(source))
            elif isinstance(source, str):
                image = Image.open(source)
            else:
                raise ImageLoadError(f"item {self.id}: no image")
            image.load()
            return image.convert("RGB")
        except ImageLoadError:
            raise
        except Exception as exc:  # PIL raises several types for truncated/corrupt files
            raise ImageLoadError(f"item {self.id}: cannot decode image ({type(exc).__name__}: {exc})") from exc


@dataclass
class ItemScore:
    score: float  # in [0, 1]
    parsed: bool = True
    metrics: Dict[str, float] = field(default_factory=dict)
    extracted: Any = None


class Task:
    """One benchmark column. Subclasses set the class attributes and implement the hooks."""

    name: str = ""
    metric: str = ""
    capability: str = ""
    task_type: str = "visual-question-answering"
    dataset_id: str = ""
    default_split: str = ""
    splits: Sequence[str] = ()
    max_new_tokens: int = 32
    prompt_family_version = "v1"

    def __init__(self, *, split: Optional[str] = None, data_path: Optional[str] = None,
                 revision: Optional[str] = None, options: Optional[Dict[str, Any]] = None):
        self.split = split or self.default_split
        if self.splits and self.split not in self.splits:
            raise TaskError(f"task {self.name}: split {self.split!r} not available (choose from {', '.join(self.splits)})")
        self.data_path = data_path
        self.revision = revision
        self.options = dict(options or {})
        self.resolved_revision: Optional[str] = None

    # -- hooks ------------------------------------------------------------
    def load(self, limit: Optional[int] = None) -> List[EvalItem]:
        raise NotImplementedError

    def prompt(self, item: EvalItem, style: str) -> str:
        return item.question

    def prompt_version(self, style: str) -> str:
        return f"{self.name}-{style}-{self.prompt_family_version}"

    def score_item(self, item: EvalItem, prediction: str, info: Dict[str, Any], style: str) -> ItemScore:
        raise NotImplementedError

    def metric_name(self) -> str:
        return self.metric

    def aggregate(self, items: Sequence[EvalItem], scores: Sequence[ItemScore]) -> Dict[str, Any]:
        """Mean item score (0–100) plus the mean of every per-item extra metric."""
        count = len(scores)
        result: Dict[str, Any] = {"score": 100.0 * sum(s.score for s in scores) / count if count else 0.0}
        extra: Dict[str, List[float]] = {}
        for s in scores:
            for key, value in s.metrics.items():
                extra.setdefault(key, []).append(value)
        result["metrics"] = {self.metric_name(): result["score"],
                             **{k: 100.0 * sum(v) / len(v) for k, v in extra.items()}}
        return result

    # -- description --------------------------------------------------------
    def dataset_revision(self) -> str:
        return self.resolved_revision or self.revision or "unpinned"

    def describe(self, style: str) -> Dict[str, Any]:
        return {
            "metric": self.metric_name(),
            "dataset_id": self.dataset_id,
            "dataset_revision": self.dataset_revision(),
            "split": self.split,
            "prompt_version": self.prompt_version(style),
            "task_type": self.task_type,
            "capability": self.capability,
        }


def style_suffix(style: str, *, math: bool = False) -> str:
    """The short-answer instruction each engine appended for a model family (PAPER.md §1.4)."""
    if style in ("qwen2_vl", "qwen2_5_vl"):
        return QWEN_SUFFIX
    if style in ("internvl", "llava"):
        return "" if math else SHORT_ANSWER_SUFFIX
    return ""


def non_empty(text: str) -> bool:
    return bool(text.strip())


Scorer = Callable[[str, Sequence[str]], float]
