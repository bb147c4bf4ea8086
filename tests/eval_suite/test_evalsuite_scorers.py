"""Scorers on hand-made cases whose right answers are worked out by hand."""

import pytest

from eval_suite.scorers import (
    acc_at_iou,
    anls,
    box_iou,
    center_hit,
    exact_match,
    levenshtein,
    normalize_exact_match,
    normalize_vqa_answer,
    parse_box_internvl,
    parse_box_qwen2_5_vl,
    parse_box_qwen2_vl,
    relaxed_accuracy,
    vqa_soft_accuracy,
    xywh_to_normalized_xyxy,
)


# -- VQA soft accuracy (EvalAI normalisation) ---------------------------------

@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"),
    ("The cat", "cat"),
    ("dont know", "don't know"),
    ("yes, it is!", "yes it is"),
    ("3.5", "3.5"),
    ("an apple", "apple"),
    ("NONE", "0"),
    ("left-hand", "left hand"),
])
def test_evalai_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_soft_accuracy_counts_the_other_nine_answers():
    answers = ["2"] * 3 + ["3"] * 7
    # "two" → "2": a "2" annotator sees 2 matching others (2/3), a "3" annotator sees 3 (1.0)
    assert vqa_soft_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_soft_accuracy("Three.", answers) == pytest.approx(1.0)
    assert vqa_soft_accuracy("4", answers) == 0.0


def test_vqa_soft_accuracy_single_matching_annotator_gives_0_3():
    answers = ["unanswerable"] + ["blue"] * 9
    assert vqa_soft_accuracy("Unanswerable", answers) == pytest.approx(9 * (1 / 3) / 10)


def test_vqa_soft_accuracy_requires_answers():
    with pytest.raises(ValueError):
        vqa_soft_accuracy("x", [])


# -- exact match --------------------------------------------------------------

def test_exact_match_fork_strips_non_word_characters():
    assert normalize_exact_match("  The  Left-Side. ") == "the leftside"
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert exact_match("No", ["yes"]) == 0.0
    assert exact_match("harry potter!", ["Harry Potter", "HP"]) == 1.0  # max over answers


def test_exact_match_upstream_only_strips_and_lowercases():
    assert exact_match("Yes.", ["yes"], style="upstream") == 0.0
    assert exact_match(" YES ", ["yes"], style="upstream") == 1.0
    with pytest.raises(ValueError):
        exact_match("a", ["a"], style="nope")


# -- relaxed accuracy -----------------------------------------------------------

@pytest.mark.parametrize("prediction, answer, expected", [
    ("10.4", "10", 1.0),      # 4 % off
    ("10.6", "10", 0.0),      # 6 % off
    ("52%", "0.52", 1.0),     # trailing % means /100
    ("0", "0", 1.0),          # gt = 0: string match
    ("0.0", "0", 0.0),        # gt = 0: string match only
    ("1,000", "1000", 0.0),   # thousands separators are not parsed
    ("Yes", "yes", 1.0),      # case-insensitive strings
    (" 24 ", "25", 1.0),      # prediction stripped; 4 % off
])
def test_relaxed_accuracy(prediction, answer, expected):
    assert relaxed_accuracy(prediction, [answer]) == expected


def test_relaxed_accuracy_max_over_answers():
    assert relaxed_accuracy("7", ["3", "7"]) == 1.0


def test_relaxed_accuracy_fork_quirk_divides_by_the_prediction():
    # |95.2 − 100| = 4.8: 4.8 % of the answer, but 5.04 % of the prediction
    assert relaxed_accuracy("95.2", ["100"]) == 1.0
    assert relaxed_accuracy("95.2", ["100"], swap_arguments=True) == 0.0
    # a prediction of 0 falls back to string match under the quirk
    assert relaxed_accuracy("0", ["0.01"], swap_arguments=True) == 0.0


# -- ANLS -----------------------------------------------------------------------

def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


def test_anls():
    assert anls("KHTX", ["KHTK"]) == pytest.approx(0.75)
    assert anls("khtk ", ["KHTK"]) == 1.0          # case and outer spaces ignored
    assert anls("AB", ["XYZW"]) == 0.0              # NL ≥ 0.5 → 0
    assert anls("ABCD", ["ABCE", "ABCD"]) == 1.0    # max over answers


# -- grounding ------------------------------------------------------------------

def test_qwen2_vl_parser_divides_0_1000_grid_values():
    assert parse_box_qwen2_vl("(100,200),(300,400)") == ([0.1, 0.2, 0.3, 0.4], True)
    assert parse_box_qwen2_vl("<|box_start|>(12,34),(560,780)<|box_end|>")[0] == pytest.approx([0.012, 0.034, 0.56, 0.78])
    assert parse_box_qwen2_vl("[100, 200, 300, 400]")[0] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert parse_box_qwen2_vl("(100, 200, 300, 400)")[0] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_qwen2_vl_parser_keeps_a_genuine_normalised_box():
    # every value ≤ 1: the /1000 rule must not fire
    assert parse_box_qwen2_vl("[0.1, 0.25, 0.5, 1]") == ([0.1, 0.25, 0.5, 1.0], True)


def test_qwen2_vl_parser_unparsable_gives_null_box():
    assert parse_box_qwen2_vl("a dog on the left") == ([0.0, 0.0, 0.0, 0.0], False)


def test_internvl_parser():
    assert parse_box_internvl("<ref>dog</ref>[[100, 200, 300, 400]]")[0] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert parse_box_internvl("[[0.1,0.2,0.3,0.4]]")[0] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # sum < 4: kept
    assert parse_box_internvl("no box") == ([0.0, 0.0, 0.0, 0.0], False)


def test_qwen2_5_vl_parser_uses_processed_pixels():
    box, ok = parse_box_qwen2_5_vl('```json\n[{"bbox_2d": [28, 56, 140, 112], "label": "cat"}]\n```', 280, 224)
    assert ok and box == pytest.approx([0.1, 0.25, 0.5, 0.5])


def test_iou_and_accuracy():
    gt = [0.0, 0.0, 1.0, 1.0]
    assert box_iou(gt, gt) == 1.0
    assert box_iou(gt, [0.5, 0.0, 1.5, 1.0]) == pytest.approx(1 / 3)
    assert box_iou(gt, [2.0, 2.0, 3.0, 3.0]) == 0.0
    assert box_iou(gt, [0.0, 0.0, 0.0, 0.0]) == 0.0
    assert acc_at_iou([0.0, 0.0, 1.0, 0.5], gt) == 1.0  # IoU exactly 0.5 counts
    assert acc_at_iou([0.0, 0.0, 1.0, 0.49], gt) == 0.0
    assert center_hit([0.4, 0.4, 0.6, 0.6], gt) == 1.0


def test_xywh_conversion():
    assert xywh_to_normalized_xyxy([20, 10, 100, 50], 200, 100) == [0.1, 0.1, 0.6, 0.6]
