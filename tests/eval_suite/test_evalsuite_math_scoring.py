"""MathVista / MATH-Vision answer extraction and the geometry-category columns."""

import pytest

from eval_suite.scorers.math import (
    JudgeError,
    JudgeExtractor,
    MathItem,
    answers_equal,
    build_judge_prompt,
    category_means,
    geometry_column,
    infer_choice,
    is_correct,
    prefetch,
    rule_extract,
)


def test_multiple_choice_letter_and_text():
    item = MathItem(answer="5", choices=("3", "5", "7"))
    assert item.target == "B"
    assert rule_extract("The answer is (B).", item) == "B"
    assert rule_extract("B", item) == "B"
    assert infer_choice("I think it is 7", {"A": "3", "B": "5", "C": "7"}) == "C"
    assert is_correct(rule_extract("(B)", item), item)
    assert not is_correct(rule_extract("(C)", item), item)


def test_ambiguous_letters_fail_to_parse():
    item = MathItem(answer="5", choices=("3", "5"))
    assert prefetch("A or B", item) is None


def test_free_form_integer_prefetch_only_when_correct():
    item = MathItem(answer="60", answer_type="integer")
    assert prefetch("60", item) == "60"
    assert prefetch("The angle is 60 degrees.", item) is None  # VLMEvalKit's prefetch is a plain cast
    assert rule_extract("The angle is 60 degrees.", item) == "60"  # our lenient rule finds it
    assert is_correct("60", item)
    assert not is_correct("61", item)


def test_free_form_float_and_unparsable():
    item = MathItem(answer="1.5", answer_type="float")
    assert is_correct(rule_extract("so x = 1.50", item), item)
    assert rule_extract("", item) is None
    assert not is_correct(None, item)


def test_mathvision_letter_answers_and_fractions():
    item = MathItem(answer="C", choices=("1", "2", "3", "4", "5"), letter_answer=True)
    assert item.target == "C"
    assert is_correct(rule_extract("Answer: C", item), item)
    free = MathItem(answer="0.5")
    assert answers_equal("1/2", "0.5")
    assert is_correct(rule_extract("The ratio is 1/2", free), free)


def test_category_means_and_geometry_column():
    hits = [True, False, True, True]
    categories = [["geometry problem solving", "geometry reasoning"], ["geometry reasoning"],
                  ["algebraic reasoning"], ["statistical reasoning"]]
    wanted = ("geometry problem solving", "geometry reasoning", "algebraic reasoning")
    means = category_means(hits, categories, wanted)
    assert means == {"geometry problem solving": 100.0, "geometry reasoning": 50.0, "algebraic reasoning": 100.0}
    assert geometry_column(means) == pytest.approx(250 / 3)  # unweighted mean of categories, not of items
    assert geometry_column({"a": None}) is None


class _Reply:
    def __init__(self, text):
        self.choices = [type("C", (), {"message": type("M", (), {"content": text})()})()]


class _FakeClient:
    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def chat_completion(self, messages, model, temperature, max_tokens):
        self.prompts.append(messages[0]["content"])
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return _Reply(reply)


def test_judge_runs_after_failed_prefetch_and_retries():
    item = MathItem(answer="42", answer_type="integer")
    client = _FakeClient([ConnectionError("boom"), "42"])
    judge = JudgeExtractor("http://judge.invalid/v1", "judge-model", client=client)
    assert judge.extract("What is x?", "After some work, x comes out as forty-two", item) == "42"
    assert len(client.prompts) == 2 and "Model response: After some work" in client.prompts[0]
    # prefetch succeeds → no call
    assert judge.extract("What is x?", "42", item) == "42" and len(client.prompts) == 2


def test_judge_reports_a_dead_endpoint():
    item = MathItem(answer="42", answer_type="integer")
    judge = JudgeExtractor("http://judge.invalid/v1", "m", client=_FakeClient([OSError("down")] * 2), retries=2)
    with pytest.raises(JudgeError, match="judge.invalid"):
        judge.extract("q", "no idea", item)


def test_judge_prompt_has_examples_and_choices():
    prompt = build_judge_prompt("Which is it?", "It's (B)", ("cat", "dog"))
    assert prompt.count("Extracted answer:") == 6
    assert "(A) cat (B) dog" in prompt
