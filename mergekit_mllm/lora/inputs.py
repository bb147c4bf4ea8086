"""LoRA experts as mergekit inputs, never materialised.

A recipe names a LoRA expert by its peft adapter directory, like any model::

    base_model: Qwen/Qwen2-VL-7B
    models:
      - model: ./adapters/chart        # adapter_config.json + adapter_model.safetensors
      - model: ./adapters/ocr

(mergekit's own ``base+adapter`` syntax is accepted too and takes the same
path instead of writing a merged copy of the model into ``lora_merge_cache``;
with it the adapter may be a Hub id, whose adapter files are downloaded. A
plain ``model:`` entry is an adapter only as a local directory: telling a Hub
adapter from a Hub model would cost a request for every model of every recipe.)

How it plugs in (:func:`install`, applied by the import hook):

* ``ModelReference.config`` of an adapter directory is its base's config, so
  architecture detection and planning see the base architecture;
* ``ModelReference.lazy_loader`` of a LoRA reference is a
  :class:`LoraTensorLoader`: it serves the base's tensor names, and a tensor
  is read from the base and the adapter's delta added when mergekit asks for
  it — one tensor at a time, as for a checkpoint on disk;
* the paper's methods ask :func:`task_vector_factors` for the exact factors
  of τᵢ = scaling·B·A (no base + Δ − base cancellation) and run their
  low-rank kernels (:mod:`mergekit_mllm.ops.lowrank`) when every expert of a
  weight is a LoRA expert.

An expert's base is the recipe's ``base_model`` (registered for the duration
of a merge by :func:`use_bases`); outside a merge, the adapter's own
``base_model_name_or_path``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Hashable
from pathlib import Path
from typing import Dict, Iterator, Literal, Mapping, Optional, Set

import torch

from mergekit_mllm.lora.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHT_NAMES,
    AdapterError,
    LoraAdapter,
    is_adapter_dir,
)
from mergekit_mllm.lora.names import NameMap
from mergekit_mllm.ops.lowrank import LOW_RANK_KERNELS, LowRank

LOG = logging.getLogger(__name__)

Kind = Literal["low_rank", "dense", "untouched", "unknown"]

# adapter path -> base ModelReference, set for the duration of a merge
_BASES: Dict[str, object] = {}
# LoRA ModelReference -> LoraExpert (like mergekit's LoaderCache, kept for the process)
_EXPERTS: Dict[object, "LoraExpert"] = {}
# weights merged by a low-rank kernel, by method (reset per merge, for the report)
LOW_RANK_MERGES: Counter = Counter()


def adapter_path_of(reference) -> Optional[str]:
    """The adapter directory a ModelReference stands for, or None."""
    if reference.lora is not None:
        return reference.lora.path
    if is_adapter_dir(reference.model.path):
        return reference.model.path
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoraExpert:
    """One LoRA expert: its adapter, its base, and the adapter resolved to the
    base's checkpoint tensor names."""

    def __init__(self, reference, adapter: LoraAdapter, base):
        self.reference = reference
        self.adapter = adapter
        self.base = base
        # Bases whose tensors the expert's base shares (task vectors against
        # any of them are the adapter's deltas); see compose.
        self.equivalent_bases: Set[object] = {base}
        self._resolved = False
        self.low_rank: Dict[str, str] = {}  # checkpoint name -> adapted module
        self.bias: Dict[str, str] = {}  # checkpoint bias name -> module with lora_B.bias
        self.saved: Dict[str, str] = {}  # checkpoint name -> adapter's whole-tensor name
        self._base_copies_checked: Set[str] = set()

    # ------------------------------------------------------------ resolution

    def base_loader(self):
        from mergekit.io.tasks import LoaderCache

        if adapter_path_of(self.base) is not None:
            raise AdapterError(f"the base of LoRA expert {self.reference} ({self.base}) is itself an adapter")
        return LoaderCache().get(self.base)

    def _resolve(self) -> None:
        if self._resolved:
            return
        from mergekit.io.tasks import LoaderCache

        loader = self.base_loader()
        names = NameMap(loader.index.base_path, loader.index.tensor_paths, LoaderCache().trust_remote_code)
        unmapped = []
        for module, spec in self.adapter.modules.items():
            target = names.checkpoint_name(spec.weight_name)
            if target is None:
                unmapped.append(spec.weight_name)
                continue
            self.low_rank[target] = module
            if spec.bias_key is not None:
                bias = names.checkpoint_name(f"{module}.bias")
                if bias is None:
                    unmapped.append(f"{module}.bias")
                else:
                    self.bias[bias] = module
        for name in self.adapter.saved_tensors:
            target = names.checkpoint_name(name)
            if target is None:
                unmapped.append(name)
            else:
                self.saved[target] = name
        if unmapped:
            shown = ", ".join(unmapped[:8]) + (f" … ({len(unmapped)} in all)" if len(unmapped) > 8 else "")
            raise AdapterError(
                f"LoRA expert {self.reference}: the adapter changes weights its base {self.base} does not have: "
                f"{shown}. Is base_model the model this adapter was trained on?"
            )
        self._resolved = True

    def kind(self, name: str) -> Kind:
        """How this expert changes checkpoint tensor ``name`` of its base."""
        self._resolve()
        if name in self.saved and name in self.low_rank and name not in self._base_copies_checked:
            self._drop_unchanged_base_copy(name)
        if name in self.saved or name in self.bias:
            return "dense"
        if name in self.low_rank:
            return "low_rank"
        if name in self.base_loader().index.tensor_paths:
            return "untouched"
        return "unknown"

    def _drop_unchanged_base_copy(self, name: str) -> None:
        # peft saves the whole base embedding next to an embedding LoRA
        # (``…base_layer.weight``); it only matters if it differs from the base.
        self._base_copies_checked.add(name)
        base = self.base_loader().get_tensor(name)
        if torch.equal(self.adapter.saved_tensor(self.saved[name]).to(base.dtype), base):
            del self.saved[name]

    # ------------------------------------------------------------ tensors

    def factors(self, name: str, shape, dtype: torch.dtype) -> Optional[LowRank]:
        """τ of ``name`` as exact factors: the adapter's (rank r) or rank 0 when
        untouched; None when the change is not low-rank (a saved tensor)."""
        kind = self.kind(name)
        if kind == "low_rank":
            factors = self.adapter.factors(self.low_rank[name]).to(dtype)
            if factors.shape != tuple(shape):
                raise AdapterError(
                    f"LoRA expert {self.reference}: the delta of {name} is {factors.shape}, the base tensor "
                    f"{tuple(shape)}"
                )
            return factors
        if kind == "untouched" and len(shape) == 2:
            return LowRank(torch.zeros(shape[0], 0, dtype=dtype), torch.zeros(0, shape[1], dtype=dtype))
        return None

    def apply(self, name: str, base_tensor: torch.Tensor) -> torch.Tensor:
        """The expert's tensor ``name``: the base's with the adapter applied."""
        kind = self.kind(name)
        if kind in ("untouched", "unknown"):
            return base_tensor
        dtype = base_tensor.dtype
        result = base_tensor.to(_compute_dtype(dtype))
        if name in self.saved:
            saved = self.adapter.saved_tensor(self.saved[name])
            if saved.shape != base_tensor.shape:
                raise AdapterError(
                    f"LoRA expert {self.reference}: saved tensor {name} is {tuple(saved.shape)}, the base's "
                    f"{tuple(base_tensor.shape)} (resized vocabularies are not supported)"
                )
            result = saved.to(result.dtype)
        if name in self.low_rank:
            delta = self.adapter.factors(self.low_rank[name]).to(result.dtype).dense()
            if delta.shape != result.shape:
                raise AdapterError(
                    f"LoRA expert {self.reference}: the delta of {name} is {tuple(delta.shape)}, the base tensor "
                    f"{tuple(result.shape)}"
                )
            result = result + delta
        if name in self.bias:
            result = result + self.adapter.bias_delta(self.bias[name]).to(result.dtype)
        return result.to(dtype)

    def summary(self) -> dict:
        self._resolve()
        return dict(self.adapter.summary(), base=str(self.base), low_rank_tensors=len(self.low_rank),
                    whole_tensors=sorted(self.saved) + sorted(self.bias))


class LoraTensorLoader:
    """mergekit's LazyTensorLoader interface for a LoRA expert.

    Its index is the base's (the expert has exactly the base's tensors); each
    tensor is the base's with the adapter applied, computed on request.
    """

    def __init__(self, expert: LoraExpert):
        self.expert = expert

    @property
    def index(self):
        return self.expert.base_loader().index

    def get_tensor(self, key: str, device: str = "cpu", aliases=None, raise_on_missing: bool = True):
        loader = self.expert.base_loader()
        if aliases and key not in loader.index.tensor_paths:
            key = next((alias for alias in aliases if alias in loader.index.tensor_paths), key)
        tensor = loader.get_tensor(key, device=device, raise_on_missing=raise_on_missing)
        if tensor is None:
            return None
        return self.expert.apply(key, tensor).to(device)

    def flush(self) -> None:
        self.expert.base_loader().flush()


# --------------------------------------------------------------------------
# Registry


def _base_for(reference, adapter: LoraAdapter):
    from mergekit.common import ModelReference, ModelPath

    if reference.lora is not None:
        return ModelReference(model=reference.model)
    base = _BASES.get(str(Path(reference.model.path)))
    if base is not None:
        return base
    if not adapter.base_model_name_or_path:
        raise AdapterError(
            f"LoRA expert {reference}: no base_model in the recipe and no base_model_name_or_path in its "
            "adapter_config.json"
        )
    return ModelReference(model=ModelPath(path=adapter.base_model_name_or_path))


def _local_adapter_dir(reference) -> str:
    """The adapter of a ``base+adapter`` reference on disk: a Hub adapter's
    config and weights are downloaded (a few MB), as mergekit would."""
    path = reference.lora.path
    if Path(path).is_dir():
        return path
    import huggingface_hub
    from mergekit.io.tasks import LoaderCache

    return huggingface_hub.snapshot_download(
        path,
        revision=reference.lora.revision,
        cache_dir=LoaderCache().hf_cache_dir,
        allow_patterns=[ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHT_NAMES],
    )


def expert_for(reference) -> Optional[LoraExpert]:
    """The LoraExpert a ModelReference stands for (None for a full model)."""
    expert = _EXPERTS.get(reference)
    if expert is not None:
        return expert
    path = adapter_path_of(reference)
    if path is None:
        return None
    adapter = LoraAdapter(_local_adapter_dir(reference) if reference.lora is not None else path)
    expert = LoraExpert(reference, adapter, _base_for(reference, adapter))
    _EXPERTS[reference] = expert
    return expert


def registered_expert(reference) -> Optional[LoraExpert]:
    """The LoraExpert already created for ``reference`` (no file access)."""
    try:
        return _EXPERTS.get(reference)
    except TypeError:  # an unhashable id
        return None


def _forget(reference) -> None:
    from mergekit.io.tasks import LoaderCache

    _EXPERTS.pop(reference, None)
    LoaderCache.loaders.pop(reference, None)


@contextlib.contextmanager
def use_bases(bases: Mapping[object, object]) -> Iterator[None]:
    """Within the block, LoRA reference → base (a ModelReference).

    A LoRA expert cached from an earlier merge against another base is
    forgotten (with mergekit's cached loader for it).
    """
    previous = dict(_BASES)
    for reference, base in bases.items():
        expert = _EXPERTS.get(reference)
        if expert is not None and expert.base != base:
            _forget(reference)
        _BASES[str(Path(reference.model.path))] = base
    try:
        yield
    finally:
        _BASES.clear()
        _BASES.update(previous)


def lora_references(references) -> list:
    return [reference for reference in references if adapter_path_of(reference) is not None]


# --------------------------------------------------------------------------
# Hooks for the paper's methods (mergekit_mllm.methods)


def task_vector_factors(group, dtype: torch.dtype) -> Dict[Hashable, LowRank]:
    """Exact τᵢ factors of the group's LoRA experts, by entry id (unweighted).

    Only experts whose delta for this tensor is low-rank (rank 0 if they leave
    it untouched) and whose base is the group's base appear; the others are
    merged from their dense tensors.
    """
    if not _EXPERTS or group.base is None:
        return {}
    base = group.base
    found = {}
    for entry in group.non_base:
        expert = registered_expert(entry.id)
        if expert is None or base.id not in expert.equivalent_bases:
            continue
        factors = expert.factors(group.metadata.name, tuple(base.tensor.shape), dtype)
        if factors is not None:
            found[entry.id] = factors
    return found


def low_rank_merge(method_name: str, group, weights, factors: Mapping[Hashable, LowRank]):
    """``kernel(**parameters)`` on the weighted low-rank τᵢ when the method has a
    low-rank kernel and every expert of the group is a low-rank LoRA expert;
    None otherwise (the dense kernel runs)."""
    kernel = LOW_RANK_KERNELS.get(method_name)
    experts = group.non_base
    if kernel is None or not experts or any(entry.id not in factors for entry in experts):
        return None
    task_vectors = [factors[entry.id].scaled(weights[entry.id]) for entry in experts]

    def run(**parameters):
        LOW_RANK_MERGES[method_name] += 1
        return kernel(task_vectors, **parameters)

    return run


# --------------------------------------------------------------------------
# mergekit patches


def install(_module=None) -> None:
    """Teach mergekit's ModelReference about adapter directories (idempotent)."""
    from mergekit.common import ModelReference

    if getattr(ModelReference, "_mergekit_mllm_lora", False):
        return
    original_config = ModelReference.config
    original_lazy_loader = ModelReference.lazy_loader
    original_merged = ModelReference.merged
    original_local_path = ModelReference.local_path

    def config(self, trust_remote_code: bool = False):
        if self.lora is None:
            expert = expert_for(self)
            if expert is not None:
                result = expert.base.config(trust_remote_code=trust_remote_code)
                if self.override_architecture:
                    result.architectures = [self.override_architecture]
                return result
        return original_config(self, trust_remote_code)

    def lazy_loader(self, cache_dir=None, lazy_unpickle: bool = True):
        expert = expert_for(self)
        if expert is not None:
            return LoraTensorLoader(expert)
        return original_lazy_loader(self, cache_dir=cache_dir, lazy_unpickle=lazy_unpickle)

    def merged(self, cache_dir=None, trust_remote_code: bool = False, lora_merge_dtype=None):
        # `base+adapter`: read the factors instead of writing a merged model to the cache.
        if self.lora is not None and expert_for(self) is not None:
            return self
        return original_merged(self, cache_dir, trust_remote_code, lora_merge_dtype)

    def local_path(self, cache_dir=None, ignore_lora: bool = False):
        # `base+adapter` as a donor of side files (tokenizer, templates): the base's.
        return original_local_path(self, cache_dir, ignore_lora=ignore_lora or self.lora is not None)

    ModelReference.config = config
    ModelReference.lazy_loader = lazy_loader
    ModelReference.merged = merged
    ModelReference.local_path = local_path
    ModelReference._mergekit_mllm_lora = True
