"""VQA soft accuracy with EvalAI answer normalisation (VizWiz, TextVQA).

Both engines the authors used (lmms-eval's ``EvalAIAnswerProcessor`` and
VLMEvalKit's ``process_answer``) normalise the prediction *and* each of the
ten human answers, then score ``acc_i = min(1, #{j ≠ i : answer_j == pred} / 3)``
and average over i. The normalisation follows the EvalAI / VQA-challenge
reference including its quirks (the period regex whose look-behind is really a
look-ahead, and ``re.sub`` receiving ``re.UNICODE`` as its *count*).
"""

from __future__ import annotations

import re
from typing import Sequence

# EvalAI's contraction table ("dont" -> "don't", ...), pairs separated by spaces.
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
"""
CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The reference regex: "(?!<=\d)" is a look-ahead (a typo for a look-behind), so a
# period is removed unless a digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # re.UNICODE (32) lands in ``count`` in the reference: at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI answer normalisation, as lmms-eval's ``EvalAIAnswerProcessor``."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the human answers of min(1, matches among the *other* answers / 3), in [0, 1]."""
    if not answers:
        raise ValueError("VQA soft accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for i in range(len(normalized)):
        others = normalized[:i] + normalized[i + 1:]
        scores.append(min(1.0, sum(other == pred for other in others) / 3.0))
    return sum(scores) / len(scores)
