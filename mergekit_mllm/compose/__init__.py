"""Modality composition (ModelCompose layout, PAPER.md §3.5).

* :mod:`~mergekit_mllm.compose.modeling`: ``ComposeForConditionalGeneration``,
  an LLM with one encoder and projector per modality (registered with the
  transformers Auto classes as ``mllm_compose``);
* :mod:`~mergekit_mllm.compose.processing`: ``ComposeProcessor``, tokenizer
  plus every modality's processor;
* :mod:`~mergekit_mllm.compose.merge`: the ``compose:`` recipe — the shared LLM
  merged with any method, every encoder and projector kept;
* :mod:`~mergekit_mllm.compose.testing`: tiny seeded single-modality experts.
"""

from mergekit_mllm.compose.modeling import ComposeConfig, ComposeForConditionalGeneration
from mergekit_mllm.compose.processing import ComposeProcessor

__all__ = ["ComposeConfig", "ComposeForConditionalGeneration", "ComposeProcessor"]
