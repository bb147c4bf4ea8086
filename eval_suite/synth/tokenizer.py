"""The synthetic family's tokenizer and processor, built offline.

Word-level for the words the synthetic questions use, character-level for
everything else (digits, letters, punctuation), so box strings such as
``(562,687),(875,1000)`` and OCR answers decode exactly: a WordPiece model with
an empty continuation prefix under a Metaspace pre-tokenizer/decoder.
"""

from __future__ import annotations

import string
from typing import List

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", IMAGE_TOKEN]
CHAT_WORDS = ["USER", "ASSISTANT"]
METASPACE = "\u2581"

# The question goes first and the image after it, whatever the order of the
# message's content items: with a causal LM the image tokens can then attend to
# the question, which a tiny model trained for minutes needs (see SYNTH_RESULTS.md).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %} <image>{% endif %}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|endoftext|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def vocabulary_words() -> List[str]:
    """Words of the frozen val split's questions, plus lowercase word answers (colours, shapes, yes/no).

    Numbers, boxes and OCR strings stay character-level.
    """
    from eval_suite.synth.tasks import TASKS, eval_items

    words = set(CHAT_WORDS)
    for task in TASKS:
        for item in eval_items(task, "val"):
            words.update(word.strip(string.punctuation) for word in item.question.split())
            words.update(answer for answer in item.answers if answer.isalpha() and answer.islower())
    words.discard("")
    return sorted(words)


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [c for c in string.printable if not c.isspace()]
    vocab = {}
    for token in (SPECIAL_TOKENS + [METASPACE + w for w in vocabulary_words()]
                  + [METASPACE + c for c in characters] + characters + [METASPACE]):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="",
                                         max_input_chars_per_word=1000))
    backend.normalizer = normalizers.Replace("\n", " ")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>",
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def build_processor(tokenizer, image_size: int, patch_size: int):
    """A stock ``LlavaProcessor`` (PIL image backend: no torchvision needed)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE,
    )
