"""The five offline synthetic tasks as evaluation tasks (frozen ``val`` / ``test`` splits)."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from eval_suite.scorers.grounding import acc_at_iou, box_iou, parse_box_qwen2_vl
from eval_suite.scorers.match import anls, relaxed_accuracy
from eval_suite.scorers.vqa import normalize_vqa_answer
from eval_suite.synth import tasks as synth
from eval_suite.tasks.base import EvalItem, ItemScore, Task, style_suffix

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


class SynthTask(Task):
    dataset_id = ""
    default_split = "test"
    splits = ("val", "test")
    prompt_family_version = "v1"

    def load(self, limit: Optional[int] = None) -> List[EvalItem]:
        items = []
        for item in synth.eval_items(self.name, self.split, limit):
            items.append(EvalItem(id=item.id, question=item.question, answers=list(item.answers),
                                  image=item.image, meta={"question_type": item.question_type, "spec": item.spec}))
        return items

    @property
    def dataset_id(self) -> str:  # type: ignore[override]
        return f"eval_suite/{self.name}"

    def dataset_revision(self) -> str:
        return f"synth-v{synth.SYNTH_VERSION}"

    def prompt(self, item: EvalItem, style: str) -> str:
        return item.question + style_suffix(style)

    def prompt_version(self, style: str) -> str:
        return f"synth-{self.prompt_family_version}" + ("" if style in ("synth", "generic") else f"+{style}-suffix")

    def aggregate(self, items, scores) -> Dict[str, Any]:
        result = super().aggregate(items, scores)
        # per question type: which skills a merge keeps or loses
        by_type: Dict[str, List[float]] = {}
        for item, score in zip(items, scores):
            by_type.setdefault(item.meta.get("question_type", "?"), []).append(score.score)
        result["by_question_type"] = {k: round(100.0 * sum(v) / len(v), 2) for k, v in sorted(by_type.items())}
        return result


class SynthVQA(SynthTask):
    name = "synth_vqa"
    metric = "exact_match"
    capability = "vqa"
    max_new_tokens = 8

    def score_item(self, item, prediction, info, style) -> ItemScore:
        pred = normalize_vqa_answer(prediction)
        return ItemScore(float(pred in {normalize_vqa_answer(a) for a in item.answers}), parsed=bool(pred))


class SynthGeometry(SynthTask):
    name = "synth_geometry"
    metric = "exact_match"
    capability = "geometry"
    max_new_tokens = 8

    def score_item(self, item, prediction, info, style) -> ItemScore:
        pred = prediction.strip().rstrip(".")
        parsed = bool(_NUMBER.match(pred))
        correct = parsed and float(pred) == float(item.answers[0])
        return ItemScore(float(correct), parsed=parsed)


class SynthChart(SynthTask):
    name = "synth_chart"
    metric = "relaxed_accuracy"
    capability = "chart"
    max_new_tokens = 8

    def score_item(self, item, prediction, info, style) -> ItemScore:
        return ItemScore(relaxed_accuracy(prediction, item.answers), parsed=bool(prediction.strip()))


class SynthOCR(SynthTask):
    name = "synth_ocr"
    metric = "exact_match"
    capability = "ocr"
    max_new_tokens = 10

    def score_item(self, item, prediction, info, style) -> ItemScore:
        pred = prediction.strip()
        exact = float(pred in item.answers)
        return ItemScore(exact, parsed=bool(pred), metrics={"anls": anls(pred, item.answers)})


class SynthGrounding(SynthTask):
    name = "synth_grounding"
    metric = "acc_iou_0.5"
    capability = "grounding"
    task_type = "object-detection"
    max_new_tokens = 24

    def prompt(self, item: EvalItem, style: str) -> str:
        return item.question  # already the Qwen2-VL grounding sentence

    def score_item(self, item, prediction, info, style) -> ItemScore:
        box, parsed = parse_box_qwen2_vl(prediction)
        gt = synth.grounding_box(item.meta["spec"])
        return ItemScore(acc_at_iou(box, gt), parsed=parsed, metrics={"iou": box_iou(gt, box)})


SYNTH_TASKS = {cls.name: cls for cls in (SynthVQA, SynthGeometry, SynthChart, SynthOCR, SynthGrounding)}
