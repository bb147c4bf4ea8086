"""MathVista / MATH-Vision answer extraction and the paper's geometry columns.

The authors' engine (VLMEvalKit) first tries a rule *prefetch* and otherwise
asks a GPT judge (gpt-4o-mini, 5-shot) to extract the answer; it cannot score
without a judge. Here:

* :func:`prefetch` is VLMEvalKit's rule step (option letter / option text for
  multiple choice; a plain ``int``/``float``/string cast for free-form) and
  only "succeeds" when it already matches the answer, as in VLMEvalKit;
* :func:`rule_extract` is our default judge-free extraction (prefetch, then
  lenient patterns such as "the answer is (B)" or the last number); its
  results are reported under ``*_rule`` metric names, never under the judged
  names, because they do not reproduce the paper's columns;
* :class:`JudgeExtractor` calls an OpenAI-compatible chat endpoint the user
  configures (``--judge-url``, ``--judge-model``, ``EVAL_SUITE_JUDGE_API_KEY``).

The paper's columns are *category means*, not overall accuracy:
MathVista = unweighted mean of the accuracies on "geometry problem solving"
(task), "geometry reasoning" and "algebraic reasoning" (skills);
MATH-Vision = mean of "metric geometry - angle/area/length" and "solid geometry".
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

MATHVISTA_GEOMETRY_CATEGORIES = ("geometry problem solving", "geometry reasoning", "algebraic reasoning")
MATHVISION_GEOMETRY_SUBJECTS = (
    "metric geometry - angle", "metric geometry - area", "metric geometry - length", "solid geometry",
)
FAIL_MSG = "Failed to obtain answer via API."


def choices_to_dict(choices: Sequence[str]) -> Dict[str, str]:
    return {string.ascii_uppercase[i]: str(choice) for i, choice in enumerate(choices)}


def infer_option_letter(response: str, choices: Mapping[str, str]) -> Optional[str]:
    """VLMEvalKit ``can_infer_option``: exactly one option letter appears as a token."""
    if FAIL_MSG in response:
        return None
    cleaned = response
    for char in ".()[],:;!*#{}":
        cleaned = cleaned.replace(char, " ")
    tokens = [t.strip() for t in cleaned.split()]
    found = [letter for letter in choices if letter in tokens]
    if len(found) == 1:
        return found[0]
    return None


def infer_option_text(response: str, choices: Mapping[str, str]) -> Optional[str]:
    """VLMEvalKit ``can_infer_text``: exactly one option's text occurs in the response."""
    lowered = response.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def infer_choice(response: str, choices: Mapping[str, str]) -> Optional[str]:
    return infer_option_letter(response, choices) or infer_option_text(response, choices)


def _parse_number(text: str) -> Optional[float]:
    text = text.strip().rstrip(".").replace("$", "").strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(prediction: str, answer: str) -> bool:
    """MATH-Vision equality: equal lowercased strings, or numbers within 1e-6.

    VLMEvalKit additionally ``eval``s both sides and tries ``latex2sympy``; we parse
    plain numbers and fractions only (no ``eval`` of model output, no sympy).
    """
    a, b = str(prediction).lower().strip(), str(answer).lower().strip()
    if a == b:
        return True
    x, y = _parse_number(a), _parse_number(b)
    return x is not None and y is not None and abs(x - y) < 1e-6


@dataclass(frozen=True)
class MathItem:
    """The fields answer extraction needs, for both MathVista and MATH-Vision."""

    answer: str
    choices: Sequence[str] = ()
    answer_type: str = "text"  # MathVista: integer | float | text | list
    letter_answer: bool = False  # MATH-Vision multiple choice answers are letters

    @property
    def is_multiple_choice(self) -> bool:
        return len(self.choices) > 0

    @property
    def target(self) -> str:
        """The answer in the form extraction produces (an option letter for multiple choice)."""
        if self.is_multiple_choice and not self.letter_answer:
            index = [str(c) for c in self.choices].index(str(self.answer))
            return string.ascii_uppercase[index]
        return str(self.answer)


def is_correct(extracted: Optional[str], item: MathItem) -> bool:
    if extracted is None:
        return False
    if item.is_multiple_choice:
        return str(extracted).strip().upper() == item.target.upper()
    if item.answer_type == "integer":
        try:
            return int(str(extracted).strip()) == int(item.answer)
        except ValueError:
            return False
    if item.answer_type == "float":
        try:
            return float(str(extracted).strip()) == float(item.answer)
        except ValueError:
            return False
    return answers_equal(extracted, item.answer)


def prefetch(response: str, item: MathItem) -> Optional[str]:
    """VLMEvalKit's rule prefetch: returns the extraction only when it is already correct
    (multiple choice: whatever letter the rules infer)."""
    if item.is_multiple_choice:
        return infer_choice(response, choices_to_dict(item.choices))
    candidate = response.strip()
    return candidate if is_correct(candidate, item) else None


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?([A-Za-z0-9.\-/]+)\)?", re.IGNORECASE)
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def rule_extract(response: str, item: MathItem) -> Optional[str]:
    """Judge-free extraction: prefetch, then lenient patterns; ``None`` = parse failure."""
    got = prefetch(response, item)
    if got is not None:
        return got
    if item.is_multiple_choice:
        choices = choices_to_dict(item.choices)
        match = _ANSWER_IS.search(response)
        if match and match.group(1).upper() in choices:
            return match.group(1).upper()
        letters = re.findall(r"\(([A-Z])\)", response)
        letters = [letter for letter in letters if letter in choices]
        return letters[-1] if letters else None
    match = _ANSWER_IS.search(response)
    if match and _parse_number(match.group(1)) is not None:
        return match.group(1).rstrip(".")
    numbers = _NUMBERS.findall(response)
    if numbers:
        return numbers[-1]
    stripped = response.strip()
    return stripped or None


# ---------------------------------------------------------------------------
# Optional judge (OpenAI-compatible chat completions)

JUDGE_TASK = (
    "Please read the following example. Then extract the answer from the model response "
    "and type it at the end of the prompt. Reply with the extracted answer only.\n"
)
# In-context examples in the style of VLMEvalKit's 5-shot extraction prompt (our wording).
JUDGE_EXAMPLES = (
    ("Which number is missing?", "", "The number missing in the sequence is 14.", "14"),
    ("What is the fraction of females facing the camera?", "",
     "The fraction of females facing the camera is 0.6, which means that six out of ten females are facing the camera.", "0.6"),
    ("How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)", "",
     "Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.", "1.45"),
    ("Between which two years does the line graph saw its maximum peak?", "",
     "The line graph saw its maximum peak between 2007 and 2008.", "[2007, 2008]"),
    ("What fraction of the shape is blue?", "(A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5",
     "The correct answer is (B) 8/11.", "B"),
)


def build_judge_prompt(question: str, response: str, choices: Sequence[str] = ()) -> str:
    parts = [JUDGE_TASK]
    for example_question, options, example_response, extracted in JUDGE_EXAMPLES:
        parts.append(f"Question: {example_question}\n" + (f"Choices: {options}\n" if options else "")
                     + f"Model response: {example_response}\nExtracted answer: {extracted}\n")
    options = " ".join(f"({letter}) {text}" for letter, text in choices_to_dict(choices).items())
    parts.append(f"Question: {question}\n" + (f"Choices: {options}\n" if options else "")
                 + f"Model response: {response}\nExtracted answer:")
    return "\n".join(parts)


class JudgeError(RuntimeError):
    """The configured judge endpoint failed; the message names the endpoint."""


class JudgeExtractor:
    """Answer extraction through an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Uses ``huggingface_hub.InferenceClient`` (already a dependency), which speaks
    the OpenAI chat-completions protocol to any ``base_url``. Rule prefetch runs
    first, as in VLMEvalKit; up to ``retries`` attempts with temperature 0, 0.5, …
    """

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, retries: int = 5, client=None):
        self.base_url = base_url
        self.model = model
        self.retries = retries
        if client is None:
            from huggingface_hub import InferenceClient

            client = InferenceClient(base_url=base_url, api_key=api_key or os.environ.get("EVAL_SUITE_JUDGE_API_KEY"))
        self.client = client

    def extract(self, question: str, response: str, item: MathItem) -> Optional[str]:
        got = prefetch(response, item)
        if got is not None:
            return got
        prompt = build_judge_prompt(question, response, item.choices)
        last_error: Optional[Exception] = None
        for attempt in range(self.retries):
            try:
                out = self.client.chat_completion(
                    messages=[{"role": "user", "content": prompt}], model=self.model,
                    temperature=attempt * 0.5, max_tokens=64,
                )
                text = (out.choices[0].message.content or "").strip()
            except Exception as exc:  # network/protocol errors: retry, then report
                last_error = exc
                continue
            if text and FAIL_MSG not in text:
                if item.is_multiple_choice:
                    return infer_choice(text, choices_to_dict(item.choices)) or text.strip().upper()[:1]
                return text
        if last_error is not None:
            raise JudgeError(f"judge endpoint {self.base_url} (model {self.model}) failed: {last_error}") from last_error
        return None


# ---------------------------------------------------------------------------
# Category means


def category_means(hits: Iterable[bool], categories: Iterable[Sequence[str]], wanted: Sequence[str]) -> Dict[str, Optional[float]]:
    """Per-category accuracy (0–100) for ``wanted`` categories; an item may belong to several."""
    totals = {c: 0 for c in wanted}
    correct = {c: 0 for c in wanted}
    for hit, item_categories in zip(hits, categories):
        for category in set(item_categories):
            if category in totals:
                totals[category] += 1
                correct[category] += bool(hit)
    return {c: (100.0 * correct[c] / totals[c] if totals[c] else None) for c in wanted}


def geometry_column(means: Mapping[str, Optional[float]]) -> Optional[float]:
    """Unweighted mean over the categories present (the paper's MathVista / MATH-Vision cell)."""
    present = [v for v in means.values() if v is not None]
    return sum(present) / len(present) if present else None
