"""Component policies: which parts of a multimodal model are merged.

Recipes set them in the top-level ``parameters:`` block, for any merge method
(ours or mergekit's)::

    parameters:
      preset: optmerge_paper      # the paper's choices for this family
      vision_tower: base          # merge (default) | base | average
      projector: merge
      embeddings: base            # input embeddings and lm_head
      norms: base
      biases: base

Every tensor has a *component* (``vision_tower`` — the modality encoder,
vision or audio —, ``projector`` or ``language_model``), taken from the module
of the architecture definition it belongs to, and possibly a *kind*
(``embeddings`` for vocabulary-indexed tensors, ``norms`` for normalisation
weights, ``biases``). The preset and the explicit keys are combined (explicit
keys win), then a kind's policy applies if set, otherwise the component's,
otherwise ``merge``.

``base`` keeps the base tensor bit-exact; ``average`` writes the mean of the
experts (the base is not included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    TensorGroup,
)

COMPONENTS = ("vision_tower", "projector", "language_model")
KINDS = ("embeddings", "norms", "biases")
POLICY_KEYS = COMPONENTS + KINDS
ACTIONS = ("merge", "base", "average")

# Recipe options of the plugin itself (accepted in `parameters:` besides the
# merge method's own parameters).
PLUGIN_OPTIONS = {
    "preset": "named set of component policies (e.g. optmerge_paper)",
    "allow_missing_tensors": "true: write a deliberately partial merge instead of stopping",
    "chat_template_donor": "model whose chat template the output gets (e.g. an instruct expert)",
    **{key: "merge | base | average" for key in POLICY_KEYS},
}

# mergekit module names -> component. Our definitions use the first three;
# mergekit's stock VLM definitions use the others.
MODULE_COMPONENTS = {
    "vision_tower": "vision_tower",
    "multi_modal_projector": "projector",
    "language_model": "language_model",
    "text_decoder": "language_model",
    "default": "language_model",
}

# Normalisation weights as they are named across the supported families
# (`input_layernorm`, `q_norm`, `norm1`, `pre_layrnorm`, Qwen2-VL's `ln_q`, …).
_NORM = re.compile(r"(norm[^.]*|(^|\.)ln(_[^.]*)?)\.(weight|bias)$|norm$")

_QWEN_PAPER = {
    "vision_tower": "base", "projector": "base", "embeddings": "base", "norms": "base", "biases": "base",
}
_INTERNVL_PAPER = {
    "vision_tower": "base", "projector": "merge", "embeddings": "base", "norms": "base", "biases": "base",
}

# preset -> family -> policies. "*" is the fallback for families the paper did
# not merge: its Qwen2-VL choice (language model only).
PRESETS: Dict[str, Dict[str, Dict[str, str]]] = {
    "optmerge_paper": {
        "qwen2_vl": _QWEN_PAPER,
        "qwen2_5_vl": _QWEN_PAPER,
        "qwen3_vl": _QWEN_PAPER,
        # The authors merge InternVL2.5's `mlp1` projector (its LayerNorm
        # weight `mlp1.0.weight` included, which is why it is not a "norm").
        "internvl_chat": _INTERNVL_PAPER,
        "internvl": _INTERNVL_PAPER,
        "*": _QWEN_PAPER,
    },
}


def tensor_kind(name: str, vocabulary_axis: Optional[int] = None) -> Optional[str]:
    """``embeddings``, ``norms``, ``biases`` or None for an output tensor."""
    if vocabulary_axis is not None:
        return "embeddings"
    if _NORM.search(name):
        return "norms"
    if name.endswith(".bias"):
        return "biases"
    return None


def preset_policies(preset: Optional[str], family: Optional[str]) -> Dict[str, str]:
    if preset is None:
        return {}
    by_family = PRESETS[preset]
    return dict(by_family.get(family or "*", by_family["*"]))


@dataclass(frozen=True)
class Decision:
    component: str
    kind: Optional[str]
    action: str
    rule: str  # the policy key that decided, or "default"


def decide(component: str, kind: Optional[str], policies: Mapping[str, str]) -> Decision:
    for key in (kind, component):
        if key is not None and key in policies:
            return Decision(component, kind, policies[key], key)
    return Decision(component, kind, "merge", "default")


def check_action(key: str, value: Any) -> str:
    if value not in ACTIONS:
        raise ValueError(f"policy '{key}' must be one of {', '.join(ACTIONS)}; got {value!r}")
    return value


def check_preset(value: Any) -> str:
    if value not in PRESETS:
        raise ValueError(f"unknown preset {value!r}; known presets: {', '.join(PRESETS)}")
    return value


# ------------------------------------------------- the two policy "methods"


class KeepBase(GroupMergeMethod):
    """Policy ``base``: the base model's tensor, unchanged."""

    spec = MergeMethodSpec(
        name="mergekit_mllm_keep_base",
        pretty_name="mergekit-mllm policy: keep base",
        contract=InputContract(base=BasePolicy.REQUIRED),
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        uses_accelerator=False,
    )

    def merge_group(self, group: TensorGroup, /, **_: Any) -> torch.Tensor:
        return group.base.tensor


class ExpertAverage(GroupMergeMethod):
    """Policy ``average``: the mean of the experts' tensors (base excluded)."""

    spec = MergeMethodSpec(
        name="mergekit_mllm_expert_average",
        pretty_name="mergekit-mllm policy: average of the experts",
        contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=1),
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_SINGLETON,
        uses_accelerator=False,
    )

    def merge_group(self, group: TensorGroup, /, **_: Any) -> torch.Tensor:
        experts = group.non_base
        dtype = experts[0].tensor.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        mean = torch.stack([e.tensor.to(compute) for e in experts]).mean(dim=0)
        return mean.to(dtype)


POLICY_METHODS: Dict[str, GroupMergeMethod] = {"base": KeepBase(), "average": ExpertAverage()}
POLICY_METHOD_NAMES: Tuple[str, ...] = tuple(m.spec.name for m in POLICY_METHODS.values())


def register_policy_methods() -> None:
    from mergekit import merge_methods

    for method in POLICY_METHODS.values():
        try:
            merge_methods.get(method.spec.name)
        except RuntimeError:
            merge_methods.register(method)
