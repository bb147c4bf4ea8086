"""Referring-expression grounding: box parsers per model family, IoU and Acc@IoU.

All boxes are handled as normalised ``[x1, y1, x2, y2]`` in [0, 1]; IoU is
invariant under scaling x and y, so scoring in normalised space equals the
engines' pixel-space scoring.
"""

from __future__ import annotations

import json
import re
from typing import List, Optional, Sequence, Tuple

Box = List[float]
NULL_BOX: Box = [0.0, 0.0, 0.0, 0.0]

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BRACKET4 = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_PAREN4 = re.compile(r"\(" + ",".join([_NUMBER] * 4) + r"\)")
_PAIRS = re.compile(r"\(" + _NUMBER + "," + _NUMBER + r"\)\s*,?\s*\(" + _NUMBER + "," + _NUMBER + r"\)")
_INTERNVL = re.compile(r"\[*\[(.*?),(.*?),(.*?),(.*?)\]\]*")


def parse_box_qwen2_vl(text: str) -> Tuple[Box, bool]:
    """Qwen2-VL answer → normalised box, as the authors' lmms-eval fork.

    Tries ``[a,b,c,d]``, then ``(a,b,c,d)``, then ``(a,b),(c,d)``; no match gives
    ``[0,0,0,0]``. Qwen2-VL answers on a 0–1000 relative grid: if any value is
    < 0 or > 1, all four are divided by 1000 (so a genuine box with every value
    ≤ 1 is kept as is). Returns ``(box, parsed)``.
    """
    for pattern in (_BRACKET4, _PAREN4, _PAIRS):
        match = pattern.search(text)
        if match:
            values = [float(v) for v in match.groups()]
            if any(v < 0 or v > 1 for v in values):
                values = [v / 1000.0 for v in values]
            return values, True
    return list(NULL_BOX), False


def parse_box_internvl(text: str) -> Tuple[Box, bool]:
    """InternVL ``[[x1,y1,x2,y2]]`` → normalised box, as InternVL's grounding evaluator.

    The four values are divided by 1000 when their sum is ≥ 4 (the 0–1000 grid);
    an unparsable answer becomes ``[0,0,0,0]``.
    """
    match = _INTERNVL.search(text)
    try:
        values = [float(v) for v in match.groups()] if match else None
    except ValueError:
        values = None
    if values is None:
        return list(NULL_BOX), False
    if sum(values) >= 4:
        values = [v / 1000.0 for v in values]
    return values, True


def parse_box_qwen2_5_vl(text: str, input_width: float, input_height: float) -> Tuple[Box, bool]:
    """Qwen2.5-VL answer (absolute pixels of the *processed* image, usually ``"bbox_2d"``).

    Qwen2.5-VL grounds in the resized input's pixel space, not on a 0–1000 grid,
    so the Qwen2-VL parser must not be reused; values are divided by the
    processed width and height.
    """
    values: Optional[List[float]] = None
    match = re.search(r'"bbox_2d"\s*:\s*(\[[^\]]*\])', text)
    if match:
        try:
            parsed = json.loads(match.group(1))
            if len(parsed) == 4:
                values = [float(v) for v in parsed]
        except (ValueError, TypeError):
            values = None
    if values is None:
        for pattern in (_BRACKET4, _PAREN4, _PAIRS):
            found = pattern.search(text)
            if found:
                values = [float(v) for v in found.groups()]
                break
    if values is None:
        return list(NULL_BOX), False
    return [values[0] / input_width, values[1] / input_height, values[2] / input_width, values[3] / input_height], True


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0 when the union is empty or inverted)."""
    x_left, y_top = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x_right, y_bottom = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    intersection = max(0.0, x_right - x_left) * max(0.0, y_bottom - y_top)
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    union = area_a + area_b - intersection
    return intersection / union if union > 0 else 0.0


def acc_at_iou(pred: Sequence[float], gt: Sequence[float], threshold: float = 0.5) -> float:
    return float(box_iou(gt, pred) >= threshold)


def center_hit(pred: Sequence[float], gt: Sequence[float]) -> float:
    """lmms-eval's Center_ACC: the predicted box's centre lies inside the ground-truth box."""
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return float(gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3])


def xywh_to_normalized_xyxy(bbox: Sequence[float], width: float, height: float) -> Box:
    """COCO ``[x, y, w, h]`` in pixels → normalised xyxy (lmms-eval's RefCOCO preprocessing)."""
    x, y, w, h = bbox
    return [x / width, y / height, (x + w) / width, (y + h) / height]
