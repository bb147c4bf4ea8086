"""Modality composition: merge the shared LLM, keep every encoder and projector.

The ModelCompose layout (PAPER.md §3.5): experts share one language model
(fine-tuned fully or with LoRA) and each adds its own modality encoder and
projector. A recipe with a ``compose:`` section composes them::

    merge_method: tsv                 # any method, ours or mergekit's
    base_model: ./vicuna-7b           # the shared LLM (a causal LM, or a composed model)
    models:
      - model: ./vision-expert        # a single-modality ComposeForConditionalGeneration
      - model: ./audio-expert-lora    # or a peft adapter over one
      - model: ./video-expert
    parameters:
      norms: base                     # component policies apply to the LLM tensors
    compose:
      adapter_bases:                  # optional: base of a LoRA expert, if not the one in its adapter_config.json
        ./audio-expert-lora: ./audio-expert-base
    dtype: float32

The *shared* tensors are those every expert has; each is merged with the
recipe's method against the base's tensor of the same name (or with the
experts' ``language_model.`` prefix removed, for a plain causal-LM base). A
tensor exactly one expert has is *unique* to it and copied. A tensor some but
not all experts have is an error (two experts of one modality would collide).
The output is one ComposeForConditionalGeneration with every modality, its
config listing them, and one ComposeProcessor (the base tokenizer plus every
placeholder token, each modality's processor); ``mergekit_mllm_compose.json``
reports what was shared, what was unique to whom, and the policy decisions.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

LOG = logging.getLogger(__name__)

SECTION = "compose"
OPTIONS = ("adapter_bases",)
REPORT_NAME = "mergekit_mllm_compose.json"
LLM_PREFIX = "language_model."


class CompositionError(ValueError):
    """A composition recipe or its experts cannot be composed; the message says why."""


@dataclass
class Expert:
    reference: Any  # mergekit ModelReference
    directory: Path  # its config and processor (for a LoRA expert: its base's)
    config: Any  # ComposeConfig
    processor: Any  # ComposeProcessor
    lora: Any  # LoraExpert or None
    names: Set[str]

    @property
    def kinds(self) -> List[str]:
        return list(self.config.modalities)


def compose_options(recipe: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The validated ``compose:`` section (``true`` or a mapping), or None."""
    if SECTION not in recipe or recipe[SECTION] in (None, False):
        return None
    section = {} if recipe[SECTION] is True else recipe[SECTION]
    if not isinstance(section, dict):
        raise CompositionError(f"`{SECTION}:` must be true or a mapping; got {section!r}")
    unknown = sorted(set(section) - set(OPTIONS))
    if unknown:
        raise CompositionError(f"unknown key(s) {unknown} in `{SECTION}:`; known: {', '.join(OPTIONS)}")
    bases = section.get("adapter_bases") or {}
    if not isinstance(bases, dict):
        raise CompositionError(f"`{SECTION}.adapter_bases` must map adapter paths to base paths")
    return {"adapter_bases": {str(k): str(v) for k, v in bases.items()}}


# ------------------------------------------------------------------ experts


def _load_expert(reference, loader_cache) -> Expert:
    from transformers import AutoConfig

    from mergekit_mllm.compose.modeling import MODEL_TYPE
    from mergekit_mllm.compose.processing import PROCESSOR_FILE, ComposeProcessor
    from mergekit_mllm.lora import inputs as lora_inputs

    lora = lora_inputs.expert_for(reference)
    directory = Path(lora.base.model.path if lora is not None else reference.model.path)
    config = AutoConfig.from_pretrained(directory)
    if config.model_type != MODEL_TYPE:
        raise CompositionError(
            f"expert {reference} is a {config.model_type!r} model; composition takes single-modality "
            f"{MODEL_TYPE} models (ComposeForConditionalGeneration) or LoRA adapters over one"
        )
    processor_dir = next((d for d in (Path(reference.model.path), directory) if (d / PROCESSOR_FILE).is_file()), None)
    if processor_dir is None:
        raise CompositionError(f"expert {reference} has no {PROCESSOR_FILE} (save its ComposeProcessor next to it)")
    names = set(loader_cache.get(reference).index.tensor_paths)
    return Expert(reference, directory, config, ComposeProcessor.from_pretrained(processor_dir), lora, names)


def split_tensors(experts: List[Expert]) -> Tuple[List[str], Dict[str, List[str]]]:
    """(shared names, unique names per expert); a partly shared name is an error."""
    counts = Counter(name for expert in experts for name in expert.names)
    shared = sorted(name for name, count in counts.items() if count == len(experts))
    partial = sorted(name for name, count in counts.items() if 1 < count < len(experts))
    if partial:
        holders = {name: [str(e.reference) for e in experts if name in e.names] for name in partial[:5]}
        raise CompositionError(
            f"{len(partial)} tensor(s) are in some experts but not all, e.g. {holders}: two experts of the "
            "same modality, or experts with different language models, cannot be composed"
        )
    unique = {str(e.reference): sorted(n for n in e.names if counts[n] == 1) for e in experts}
    return shared, unique


def base_names_for(shared: List[str], base_names: Set[str]) -> Dict[str, str]:
    """Shared expert tensor name → the base's name for it."""
    mapping, missing = {}, []
    for name in shared:
        if name in base_names:
            mapping[name] = name
        elif name.startswith(LLM_PREFIX) and name[len(LLM_PREFIX):] in base_names:
            mapping[name] = name[len(LLM_PREFIX):]
        else:
            missing.append(name)
    if missing:
        raise CompositionError(
            f"base_model has no tensor for {len(missing)} tensor(s) all experts share, e.g. {missing[:5]}; "
            "is it the language model the experts were fine-tuned from?"
        )
    return mapping


def _check_modalities(experts: List[Expert]) -> None:
    owner: Dict[str, str] = {}
    for expert in experts:
        if not expert.kinds:
            raise CompositionError(f"expert {expert.reference} has no modality")
        for kind in expert.kinds:
            if kind in owner:
                raise CompositionError(f"modality {kind!r} comes from both {owner[kind]} and {expert.reference}")
            owner[kind] = str(expert.reference)
    first = experts[0].config.text_config.to_dict()
    for expert in experts[1:]:
        other = expert.config.text_config.to_dict()
        differing = sorted(k for k in set(first) | set(other)
                           if k not in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")
                           and first.get(k) != other.get(k))
        if differing:
            raise CompositionError(
                f"experts {experts[0].reference} and {expert.reference} have different language models "
                f"(text_config differs in {differing[:6]})"
            )


# ------------------------------------------------------------------ merging


class _Parameters:
    """The recipe's method parameters and component policies, per tensor."""

    def __init__(self, merge_config, method, base, experts: List[Expert]):
        from mergekit.config import ConfigReader, InputSliceDefinition, OutputSliceDefinition
        from mergekit.merge_methods.base import ParameterScope, ParameterSpec

        from mergekit_mllm import policy

        sources = [InputSliceDefinition(model=m.model, layer_range=(0, 1), parameters=m.parameters)
                   for m in merge_config.models]
        self.reader = ConfigReader(config=merge_config, t=0, slice_out=OutputSliceDefinition(sources=sources))
        self.method, self.base, self.experts = method, base, experts
        self.policy_specs = {key: ParameterSpec(key, Optional[str], ParameterScope.SHARED, default=None)
                             for key in policy.POLICY_KEYS + ("preset",)}

    def policies(self, name: str) -> Dict[str, str]:
        from mergekit.parameter_resolver import resolve_parameter

        from mergekit_mllm import policy

        settings = tuple(self.reader.parameter_sources(None))
        values = {k: resolve_parameter(s, settings, tensor_name=name) for k, s in self.policy_specs.items()}
        result = policy.preset_policies(values.pop("preset"), None)
        result.update({k: v for k, v in values.items() if v is not None})
        return result

    def for_tensor(self, method, name: str) -> Dict[str, Any]:
        from mergekit.merge_methods.base import ParameterScope
        from mergekit.parameter_resolver import resolve_parameters

        models = [self.base] + [e.reference for e in self.experts]
        shared, per_input = resolve_parameters(
            method.spec, tensor_name=name, inputs={m: name for m in models},
            sources=self.reader.parameter_sources, base_model=self.base,
        )
        parameters = dict(shared)
        for spec in method.spec.input_parameters:
            ids = models if spec.scope == ParameterScope.INPUT else models[1:]
            parameters[spec.name] = {m: per_input[m][spec.name] for m in ids}
        return parameters


def _vocabulary_axis(tensor: torch.Tensor, vocab_size: int) -> Optional[int]:
    return 0 if tensor.ndim == 2 and tensor.shape[0] == vocab_size else None


def _check_lora_base(expert: Expert, name: str, base_tensor: torch.Tensor) -> None:
    """A LoRA expert's deltas are task vectors against base_model only if its
    own base has base_model's language model."""
    own = expert.lora.base_loader().get_tensor(name)
    if own.shape != base_tensor.shape or not torch.equal(own.double(), base_tensor.double()):
        raise CompositionError(
            f"LoRA expert {expert.reference}: its base {expert.lora.base} differs from base_model at {name}; "
            "its adapter was trained over another language model"
        )


def merge_shared(merge_config, options, base, experts, shared, base_name, writer, dtype, out_dtype) -> Counter:
    from mergekit import merge_methods
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    from mergekit_mllm import policy
    from mergekit_mllm.planner import check_recipe_parameters

    method = merge_methods.get(merge_config.merge_method)
    check_recipe_parameters(merge_config, method)
    parameters = _Parameters(merge_config, method, base, experts)
    vocab_size = experts[0].config.text_config.vocab_size
    cache = LoaderCache()
    decisions: Counter = Counter()
    for name in shared:
        base_tensor = cache.get(base).get_tensor(base_name[name])
        entries = [TensorEntry(base, base_tensor, is_base=True)]
        for expert in experts:
            if expert.lora is not None:
                _check_lora_base(expert, name, base_tensor)
            entries.append(TensorEntry(expert.reference, cache.get(expert.reference).get_tensor(name)))
        if not base_tensor.is_floating_point():
            writer.save_tensor(name, base_tensor)
            continue
        axis = _vocabulary_axis(base_tensor, vocab_size)
        decision = policy.decide("language_model", policy.tensor_kind(name, axis), parameters.policies(name))
        decisions[(decision.kind or "-", decision.action)] += 1
        tensor_method = method if decision.action == "merge" else policy.POLICY_METHODS[decision.action]
        group = TensorGroup(entries=tuple(entries), metadata=TensorMetadata(name=name, vocabulary_axis=axis))
        tensor_method.validate_inputs([e.id for e in entries], base, group_name=name)
        group.validate_tensors()
        (result,) = tensor_method((group,), parameters=parameters.for_tensor(tensor_method, name),
                                  dtype=dtype, out_dtype=out_dtype or base_tensor.dtype)
        writer.save_tensor(name, result)
    return decisions


# ------------------------------------------------------------------ outputs


def composed_config(experts: List[Expert], tokenizer, dtype):
    from mergekit_mllm.compose.modeling import ComposeConfig

    modalities = {}
    for expert in experts:
        for kind, spec in expert.config.modalities.items():
            modalities[kind] = dict(spec, token_id=tokenizer.convert_tokens_to_ids(spec["token"]))
    config = ComposeConfig(text_config=experts[0].config.text_config.to_dict(), modalities=modalities,
                           architectures=["ComposeForConditionalGeneration"])
    if dtype is not None:
        config.dtype = str(dtype).replace("torch.", "")
    return config


def composed_processor(base_dir: Path, experts: List[Expert]):
    """The base's tokenizer plus every modality's placeholder; every modality's processor."""
    from transformers import AutoTokenizer

    from mergekit_mllm.compose.processing import ComposeProcessor

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    processors, modalities = {}, {}
    for expert in experts:
        for kind, spec in expert.processor.modalities.items():
            processors[kind] = expert.processor.processors[kind]
            modalities[kind] = spec
    tokens = [spec["token"] for spec in modalities.values()]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return ComposeProcessor(tokenizer, processors, modalities)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    from mergekit.common import dtype_from_name

    return dtype_from_name(name) if name else None


def compose(merge_config, out_path, options, section: Dict[str, Any], config_source: Optional[str] = None) -> dict:
    """Compose the recipe's experts into ``out_path``; returns the report."""
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache
    from mergekit.io.tensor_writer import TensorWriter

    from mergekit_mllm.lora import inputs as lora_inputs

    if merge_config.slices or merge_config.modules or not merge_config.models:
        raise CompositionError("a composition recipe lists its experts under `models:` (no slices or modules)")
    base = merge_config.base_model
    if base is None or lora_inputs.adapter_path_of(base) is not None:
        raise CompositionError("a composition recipe needs base_model: the shared language model (a full model)")
    references = [m.model for m in merge_config.models if m.model != base]
    if len(references) < 2:
        raise CompositionError("composition needs at least two experts")
    cache = LoaderCache()
    cache.setup(options)
    overrides = {ModelReference.parse(path): ModelReference.parse(b) for path, b in section["adapter_bases"].items()}
    out = Path(out_path)
    with lora_inputs.use_bases(overrides):
        experts = [_load_expert(reference, cache) for reference in references]
        _check_modalities(experts)
        shared, unique = split_tensors(experts)
        base_name = base_names_for(shared, set(cache.get(base).index.tensor_paths))
        for expert in experts:
            if expert.lora is not None:
                expert.lora.equivalent_bases.add(base)  # checked tensor by tensor in merge_shared
        writer = TensorWriter(str(out), max_shard_size=options.out_shard_size, safe_serialization=True)
        try:
            decisions = merge_shared(merge_config, options, base, experts, shared, base_name, writer,
                                     _dtype(merge_config.dtype), _dtype(merge_config.out_dtype))
            out_dtype = _dtype(merge_config.out_dtype)
            for expert in experts:
                loader = cache.get(expert.reference)
                for name in unique[str(expert.reference)]:
                    tensor = loader.get_tensor(name)
                    writer.save_tensor(name, tensor.to(out_dtype) if out_dtype and tensor.is_floating_point() else tensor)
            writer.finalize()
        finally:
            for expert in experts:
                if expert.lora is not None:
                    expert.lora.equivalent_bases.discard(base)
    processor = composed_processor(Path(base.local_path(cache_dir=options.transformers_cache)), experts)
    processor.save_pretrained(out)
    composed_config(experts, processor.tokenizer, _dtype(merge_config.out_dtype or merge_config.dtype)).save_pretrained(out)
    report = {
        "merge_method": merge_config.merge_method,
        "base_model": str(base),
        "shared_tensors": len(shared),
        "base_name_prefix_removed": LLM_PREFIX if any(k != v for k, v in base_name.items()) else "",
        "decisions": [{"kind": None if k == "-" else k, "action": a, "tensors": n}
                      for (k, a), n in sorted(decisions.items())],
        "experts": {
            str(e.reference): {"modalities": e.kinds, "lora": e.lora is not None,
                               "unique_tensors": len(unique[str(e.reference)]),
                               "unique": unique[str(e.reference)]}
            for e in experts
        },
        "modalities": {kind: {"token": spec["token"], "token_id": processor.token_id(kind),
                              "tokens_per_item": spec["tokens_per_item"]}
                       for kind, spec in processor.modalities.items()},
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if config_source:
        (out / "mergekit_config.yml").write_text(config_source)
    if options.write_model_card:
        from mergekit.card import generate_card

        card = generate_card(config=merge_config, config_yaml=config_source or merge_config.to_yaml(), name=out.name)
        (out / "README.md").write_text(card)
    LOG.info("mergekit-mllm: composed %s into %s", ", ".join(k for e in experts for k in e.kinds), out)
    return report
