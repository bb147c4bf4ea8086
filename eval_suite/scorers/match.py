"""Exact match (GQA, OCR-VQA), relaxed accuracy (ChartQA) and ANLS (OCR, DocVQA)."""

from __future__ import annotations

import re
from typing import Optional, Sequence

_NON_WORD = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def normalize_exact_match(text: str, style: str = "fork") -> str:
    """Answer normalisation before exact match.

    ``fork`` (default, the authors' VLMEvalKit fork used for the paper's GQA and
    OCR-VQA columns): lowercase, delete every character that is neither a word
    character nor whitespace, collapse whitespace. ``upstream`` (stock
    VLMEvalKit): strip and lowercase only.
    """
    if style == "upstream":
        return text.strip().lower()
    if style != "fork":
        raise ValueError(f"unknown exact-match style {style!r} (use 'fork' or 'upstream')")
    return _SPACES.sub(" ", _NON_WORD.sub("", text.lower())).strip()


def exact_match(prediction: str, answers: Sequence[str], style: str = "fork") -> float:
    """1.0 if the normalised prediction equals any normalised answer (max over answers)."""
    pred = normalize_exact_match(prediction, style)
    return float(any(pred == normalize_exact_match(answer, style) for answer in answers))


def _to_float(text: str) -> Optional[float]:
    # VLMEvalKit/pix2struct: a trailing % means /100; thousands separators are not parsed.
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed match of one ground truth ``target``.

    Numbers (both parse as floats, target non-zero): |prediction − target| / |target|
    ≤ 5 %. Otherwise case-insensitive string equality.
    """
    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str], *, swap_arguments: bool = False,
                     max_relative_change: float = 0.05) -> float:
    """Max over the ground-truth list of :func:`relaxed_correctness` (prediction stripped).

    ``swap_arguments=True`` reproduces the authors' VLMEvalKit fork, which calls
    ``relaxed_correctness(prediction, gt)``: the relative error is then divided by
    |prediction| and a prediction of 0 falls back to string match. The default
    is the correct order (denominator |gt|), as in the ChartQA paper.
    """
    pred = prediction.strip()
    if swap_arguments:
        hits = [relaxed_correctness(pred, str(gt), max_relative_change) for gt in answers]
    else:
        hits = [relaxed_correctness(str(gt), pred, max_relative_change) for gt in answers]
    return float(any(hits))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one item (DocVQA/InfoVQA definition).

    Per answer: NL = lev(p, g) / max(|p|, |g|) on lowercased, stripped,
    space-collapsed strings; similarity 1 − NL if NL < τ else 0; max over answers.
    """
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        gt = " ".join(str(answer).strip().lower().split())
        length = max(len(pred), len(gt))
        distance = levenshtein(pred, gt) / length if length else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best
