"""Scorers faithful to the engines the paper used (see PAPER.md §1.3).

Every scorer takes one prediction string and the item's ground truth and
returns a score in [0, 1]; tasks average them and report 0–100.
"""

from eval_suite.scorers.grounding import (
    acc_at_iou,
    box_iou,
    center_hit,
    parse_box_internvl,
    parse_box_qwen2_5_vl,
    parse_box_qwen2_vl,
    xywh_to_normalized_xyxy,
)
from eval_suite.scorers.match import anls, exact_match, levenshtein, normalize_exact_match, relaxed_accuracy, relaxed_correctness
from eval_suite.scorers.vqa import normalize_vqa_answer, vqa_soft_accuracy

__all__ = [
    "acc_at_iou", "anls", "box_iou", "center_hit", "exact_match", "levenshtein", "normalize_exact_match",
    "normalize_vqa_answer", "parse_box_internvl", "parse_box_qwen2_5_vl", "parse_box_qwen2_vl",
    "relaxed_accuracy", "relaxed_correctness", "vqa_soft_accuracy", "xywh_to_normalized_xyxy",
]
