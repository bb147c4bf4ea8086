"""In-memory module names ↔ checkpoint tensor names, and the model's Linear layers.

peft names adapted modules by transformers' in-memory paths, which for many
VLMs differ from the names on disk: transformers 5 loads Qwen2-VL's
``model.layers.0…`` into ``model.language_model.layers.0…`` and writes the
legacy name back on save. The mapping is transformers' own: the model is
built on the meta device (no memory) and every checkpoint name is renamed
with the conversion rules ``from_pretrained`` applies.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache
from typing import Dict, FrozenSet, Optional, Tuple

LOG = logging.getLogger(__name__)


def build_meta_model(model_dir: str, trust_remote_code: bool = False):
    """The model class of ``model_dir``'s config, instantiated on the meta device."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        if model_class is not None:
            return model_class._from_config(config)
        auto_map = getattr(config, "auto_map", None) or {}
        for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel"):
            if auto in auto_map or not auto_map:
                try:
                    return getattr(transformers, auto).from_config(config, trust_remote_code=trust_remote_code)
                except (ValueError, KeyError):
                    continue
    raise ValueError(f"cannot build a model for {model_dir} (architectures {config.architectures})")


@lru_cache(maxsize=16)
def _in_memory_to_checkpoint(model_dir: str, checkpoint_names: FrozenSet[str], trust_remote_code: bool) -> Dict[str, str]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    model = build_meta_model(model_dir, trust_remote_code)
    in_memory = model.state_dict()
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    mapping = {}
    for name in sorted(checkpoint_names):
        renamed, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, in_memory)
        mapping.setdefault(renamed, name)
    return mapping


class NameMap:
    """Maps in-memory parameter names of one base model to its checkpoint names.

    A name that is already a checkpoint name is used as it is (adapters made
    with older transformers, models without renamings); otherwise
    transformers' load-time renaming of the checkpoint decides. The meta model
    is only built when some name needs it.
    """

    def __init__(self, model_dir: str, checkpoint_names, trust_remote_code: bool = False):
        self.model_dir = str(model_dir)
        self.checkpoint_names = frozenset(checkpoint_names)
        self.trust_remote_code = trust_remote_code

    def _renamed(self) -> Dict[str, str]:
        return _in_memory_to_checkpoint(self.model_dir, self.checkpoint_names, self.trust_remote_code)

    def checkpoint_name(self, in_memory_name: str) -> Optional[str]:
        if in_memory_name in self.checkpoint_names:
            return in_memory_name
        try:
            return self._renamed().get(in_memory_name)
        except Exception as error:  # a model transformers cannot build: identity names only
            LOG.debug("mergekit-mllm: no name conversion for %s (%s)", self.model_dir, error)
            return None

    def in_memory_name(self, checkpoint_name: str) -> str:
        """The name transformers loads checkpoint tensor ``checkpoint_name`` as."""
        if not hasattr(self, "_inverse"):
            self._inverse = {checkpoint: in_memory for in_memory, checkpoint in self._renamed().items()}
        return self._inverse.get(checkpoint_name, checkpoint_name)


def linear_weights(model_dir: str, trust_remote_code: bool = False) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """In-memory weight name → (module kind, shape) for the modules a LoRA can adapt.

    ``linear`` (nn.Linear), ``transposed`` (GPT-2 style Conv1D, weight in×out)
    and ``embedding`` (nn.Embedding), as peft dispatches them.
    """
    import torch

    model = build_meta_model(model_dir, trust_remote_code)
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2:
            continue
        if isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif type(module).__name__ == "Conv1D":
            kind = "transposed"
        else:
            continue
        found[f"{name}.weight" if name else "weight"] = (kind, tuple(weight.shape))
    return found
