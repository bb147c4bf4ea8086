"""mergekit declarations of the paper's merge methods: one table, one adapter.

Each method is a mergekit ``GroupMergeMethod`` with a required base model.
Task vectors are τᵢ = weightᵢ·(expertᵢ − base); the method's kernel (a pure
function in :mod:`mergekit_mllm.ops`) returns the merged task vector τ_m and
the output is ``base + λ·τ_m``, computed in float32 (float64 for float64
inputs), checked for NaN/Inf and cast back to the checkpoint dtype.

Task Arithmetic is mergekit's own ``task_arithmetic`` (identical to the
paper's). mergekit's ``ties``/``dare_ties``/``dare_linear`` are different
algorithms (weight-normalised sums, L1 rescaling, one mask family); the
paper's versions are registered here as ``ties_merging``,
``dare_task_arithmetic`` and ``dare_ties_merging``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_mllm import ops
from mergekit_mllm.lora import inputs as lora_inputs
from mergekit_mllm.ops import streaming
from mergekit_mllm.ops.interference import DEFAULT_LR

PAPER = "Wei et al., OptMerge: Unifying Multimodal LLM Capabilities and Modalities via Model Merging (ICLR 2026)"


class MergeInputError(ValueError):
    """A merge input or parameter is unusable; the message names it."""


# --------------------------------------------------------------------------
# Parameter validation with messages that name the parameter.


def _check(description: str, predicate: Callable[[Any], bool], parameter: str):
    def validate(value):
        if value is not None and not predicate(value):
            raise ValueError(f"parameter '{parameter}' must be {description}; got {value!r}")
        return value

    return AfterValidator(validate)


def _finite(x) -> bool:
    return math.isfinite(x)


def _param(name: str, value_type: Any, default: Any, description: str, check=None, scope=ParameterScope.SHARED):
    if check is not None:
        value_type = Annotated[value_type, _check(check[0], check[1], name)]
    return ParameterSpec(name=name, value_type=value_type, scope=scope, default=default, description=description)


LAMBDA = _param(
    "lambda", float, 1.0, "scales the merged task vector: base + λ·τ_m",
    check=("a finite number", _finite),
)
WEIGHT = _param(
    "weight", float, 1.0, "per-model factor applied to τᵢ before merging",
    check=("a finite number", _finite), scope=ParameterScope.NON_BASE,
)
DENSITY = _param(
    "density", float, 0.2, "fraction of |τᵢ| kept per tensor (TIES trim)",
    check=("in (0, 1]", lambda x: 0.0 < x <= 1.0),
)
DROP_RATE = _param(
    "drop_rate", float, 0.2, "DARE drop probability p; kept entries are rescaled by 1/(1−p)",
    check=("in [0, 1)", lambda x: 0.0 <= x < 1.0),
)
SEED = _param("seed", int, 0, "DARE seed; masks depend only on seed, tensor name and expert index")
RANK_FRACTION = _param(
    "rank_fraction", Optional[float], None, "k = ⌊min(m, n)·rank_fraction⌋ per task (default 1/N)",
    check=("in (0, 1]", lambda x: 0.0 < x <= 1.0),
)
COMMON_SPACE_FRACTION = _param(
    "common_space_fraction", float, 0.8, "share of the rank given to the common subspace of Σ τᵢ",
    check=("in [0, 1]", lambda x: 0.0 <= x <= 1.0),
)
ITERATIONS = _param(
    "iterations", int, 300, "optimiser steps per weight",
    check=("a non-negative integer", lambda x: x >= 0),
)
WUDI_LR = _param("lr", float, 1e-5, "Adam learning rate", check=("a positive number", lambda x: x > 0 and _finite(x)))
OPTMERGE_LR = _param(
    "lr", Optional[float], None,
    f"learning rate (default: {DEFAULT_LR['lora']} for lora/SGD, {DEFAULT_LR['full']} for full/Adam)",
    check=("a positive number", lambda x: x > 0 and _finite(x)),
)
MOMENTUM = _param(
    "momentum", float, 0.9, "SGD momentum (variant lora)",
    check=("in [0, 1)", lambda x: 0.0 <= x < 1.0),
)
VARIANT = _param(
    "variant", str, "lora",
    "lora: truncated τᵢ targets, mean init, SGD (Qwen2-VL code); full: centred truncation + τ̄, sum init, Adam (InternVL code)",
    check=("'lora' or 'full'", lambda x: x in ("lora", "full")),
)


# --------------------------------------------------------------------------
# The table of methods.


@dataclass(frozen=True)
class MethodDeclaration:
    name: str
    pretty_name: str
    reference_url: str
    citation: str
    kernel: Callable[..., torch.Tensor]
    parameters: Tuple[ParameterSpec, ...] = ()
    # SVD and optimiser methods act on 2-D, non-vocabulary weights only; other
    # tensors get λ·mean(τ), as in the authors' code.
    matrix_only: bool = False
    # Extra kernel arguments derived from the tensor group.
    context: Callable[[TensorGroup, int], Dict[str, Any]] = field(default=lambda group, n: {})


def _rank_fraction(params: Dict[str, Any], num_tasks: int) -> float:
    value = params.pop("rank_fraction")
    return 1.0 / num_tasks if value is None else value


def _tsv(task_vectors, *, rank_fraction):
    return ops.tsv(task_vectors, rank_fraction=rank_fraction)


def _optmerge(task_vectors, *, variant, rank_fraction, iterations, lr, momentum):
    return ops.optmerge(
        task_vectors, variant=variant, rank_fraction=rank_fraction, iterations=iterations, lr=lr, momentum=momentum
    )


def _tensor_name(group: TensorGroup, _n: int) -> Dict[str, Any]:
    return {"tensor_name": group.metadata.name}


DECLARATIONS: Tuple[MethodDeclaration, ...] = (
    MethodDeclaration(
        "weight_average", "Weight Average", "https://arxiv.org/abs/2203.05482",
        "Wortsman et al., Model soups (ICML 2022)", ops.weight_average,
    ),
    MethodDeclaration(
        "ties_merging", "TIES-Merging (paper)", "https://arxiv.org/abs/2306.01708",
        "Yadav et al., TIES-Merging (NeurIPS 2023)", ops.ties_merging, (DENSITY,),
    ),
    MethodDeclaration(
        "dare_task_arithmetic", "Task Arithmetic w/ DARE", "https://arxiv.org/abs/2311.03099",
        "Yu et al., Language Models are Super Mario (ICML 2024)", ops.dare_task_arithmetic,
        (DROP_RATE, SEED), context=_tensor_name,
    ),
    MethodDeclaration(
        "dare_ties_merging", "TIES-Merging w/ DARE", "https://arxiv.org/abs/2311.03099",
        "Yu et al., Language Models are Super Mario (ICML 2024)", ops.dare_ties_merging,
        (DROP_RATE, DENSITY, SEED), context=_tensor_name,
    ),
    MethodDeclaration(
        "tsv", "Task Singular Vectors", "https://arxiv.org/abs/2412.00081",
        "Gargiulo et al., Task Singular Vectors (CVPR 2025)", _tsv, (RANK_FRACTION,), matrix_only=True,
    ),
    MethodDeclaration(
        "iso_c", "Iso-C", "https://arxiv.org/abs/2502.04959",
        "Marczak et al., No Task Left Behind: Isotropic Model Merging (ICML 2025)", ops.iso_c, matrix_only=True,
    ),
    MethodDeclaration(
        "iso_cts", "Iso-CTS", "https://arxiv.org/abs/2502.04959",
        "Marczak et al., No Task Left Behind: Isotropic Model Merging (ICML 2025)", ops.iso_cts,
        (COMMON_SPACE_FRACTION,), matrix_only=True,
    ),
    MethodDeclaration(
        "wudi", "WUDI Merging", "https://arxiv.org/abs/2503.08099",
        "Cheng et al., Whoever Started the Interference Should End It (ICML 2025)", ops.wudi,
        (ITERATIONS, WUDI_LR), matrix_only=True,
    ),
    MethodDeclaration(
        "optmerge", "OptMerge", "https://arxiv.org/abs/2505.19892", PAPER, _optmerge,
        (VARIANT, RANK_FRACTION, ITERATIONS, OPTMERGE_LR, MOMENTUM), matrix_only=True,
    ),
)


# --------------------------------------------------------------------------
# Closed forms of the interference objective (issue 8): the exact minimiser
# of WUDI/OptMerge and the authors' later SWUDI/ASWUDI spectral filters. The
# math is in mergekit_mllm.ops.closed_form; each answer is a filter F(ℓ) on
# the eigenvalues of C applied from the initial point τ₀.

SPECTRAL_FOLLOW_UP = (
    "https://github.com/WalkerWorldPeace/MLLMerging",
    "OptMerge authors' follow-up, Closed-Form Spectral Regularization for Multi-Task Model Merging (MLLMerging code)",
)
INIT_MODE_SUM = _param(
    "init_mode", str, "sum",
    "initial point τ₀: sum (Σ τᵢ), mean or zero; the filter moves it toward the minimiser and it stays "
    "where C is blind (with sum, λ ≈ 1/N keeps the scale of one expert)",
    check=("'sum', 'mean' or 'zero'", lambda x: x in ops.closed_form.INIT_MODES),
)
INIT_MODE_OF_VARIANT = _param(
    "init_mode", Optional[str], None,
    "τ₀ kept in the null space of C: sum, mean or zero (default: the variant's own, mean for lora, sum for full)",
    check=("'sum', 'mean' or 'zero'", lambda x: x in ops.closed_form.INIT_MODES),
)
RCOND = _param(
    "rcond", Optional[float], None,
    "eigenvalues of C ≤ max(1e-8, rcond·ℓ_max) count as zero (default n·float32 ε, numpy's matrix_rank rule)",
    check=("in [0, 1)", lambda x: 0.0 <= x < 1.0),
)
RIDGE = _param(
    "ridge", float, 0.0,
    "ρ ≥ 0: minimise L(τ) + ρ‖τ − τ₀‖² instead (filter ℓ/(ℓ+ρ); ℓ is scale-free, tr C ≤ N); 0 is the exact minimiser",
    check=("a non-negative number", lambda x: x >= 0 and _finite(x)),
)
EXP_TIME = _param(
    "exp_time", float, 300.0, "t of the filter F = 1 − exp(−t·ℓ) (gradient-flow time)",
    check=("a positive number", lambda x: x > 0 and _finite(x)),
)
ASWUDI_EXP_TIME = _param(
    "exp_time", float, 1e6, "t of the filter F = 1 − exp(−t·ℓ) when filter_type is exponential",
    check=("a positive number", lambda x: x > 0 and _finite(x)),
)
TRUNCATE_RANK_RATIO = _param(
    "truncate_rank_ratio", Optional[float], 0.65,
    "keep the filter on the top ⌈n·ratio⌉ eigenvalues of C only (null: all); 0.65 is the released "
    "default (CLIP), the authors suggest 0.85 for LLM/VLM deltas",
    check=("in (0, 1]", lambda x: 0.0 < x <= 1.0),
)
SWUDI_FILTER = _param(
    "filter_type", str, "exponential",
    "exponential: F = 1 − exp(−t·ℓ); none: F = 1 (hard rank truncation)",
    check=("'exponential' or 'none'", lambda x: x in ops.closed_form.FILTER_TYPES),
)
ASWUDI_FILTER = _param(
    "filter_type", str, "none",
    "none: F = 1 on the top K (hard truncation); exponential: F = 1 − exp(−t·ℓ) on the top K",
    check=("'exponential' or 'none'", lambda x: x in ops.closed_form.FILTER_TYPES),
)


def _known_rank_rule(value: str) -> bool:
    return value in ops.closed_form.RANK_RULES[:-1] or (
        value.startswith("cumvar_") and value[7:].replace(".", "", 1).isdigit() and 0 < float(value[7:]) <= 1
    )


AUTO_RANK_METHOD = _param(
    "auto_rank_method", str, "participation_sqrt",
    "rule choosing K per weight from the eigenvalues ℓ of C: participation_sqrt ⌈(Σ√ℓ)²/Σℓ⌉, "
    "participation, stable_rank, entropy, gavish_donoho (the released approximation), cumvar_<fraction>",
    check=(f"one of {ops.closed_form.RANK_RULES}", _known_rank_rule),
)
MIN_RANK = _param("min_rank", int, 1, "smallest K", check=("a positive integer", lambda x: x >= 1))
MAX_RANK_RATIO = _param(
    "max_rank_ratio", float, 1.0, "largest K as a fraction of n",
    check=("in (0, 1]", lambda x: 0.0 < x <= 1.0),
)


def _optmerge_exact(task_vectors, *, variant, rank_fraction, init_mode, rcond, ridge):
    return ops.optmerge_exact(
        task_vectors, variant=variant, rank_fraction=rank_fraction, init_mode=init_mode, rcond=rcond, ridge=ridge
    )


DECLARATIONS = DECLARATIONS + (
    MethodDeclaration(
        "wudi_exact", "WUDI (exact minimiser)", "https://arxiv.org/abs/2503.08099",
        "Cheng et al., Whoever Started the Interference Should End It (ICML 2025); closed form as in issue 8",
        ops.wudi_exact, (INIT_MODE_SUM, RCOND, RIDGE), matrix_only=True,
    ),
    MethodDeclaration(
        "optmerge_exact", "OptMerge (exact minimiser)", "https://arxiv.org/abs/2505.19892", PAPER,
        _optmerge_exact, (VARIANT, RANK_FRACTION, INIT_MODE_OF_VARIANT, RCOND, RIDGE), matrix_only=True,
    ),
    MethodDeclaration(
        "swudi", "SWUDI", *SPECTRAL_FOLLOW_UP, ops.swudi,
        (EXP_TIME, TRUNCATE_RANK_RATIO, SWUDI_FILTER, INIT_MODE_SUM), matrix_only=True,
    ),
    MethodDeclaration(
        "aswudi", "ASWUDI", *SPECTRAL_FOLLOW_UP, ops.aswudi,
        (AUTO_RANK_METHOD, MIN_RANK, MAX_RANK_RATIO, ASWUDI_FILTER, ASWUDI_EXP_TIME, INIT_MODE_SUM),
        matrix_only=True,
    ),
)


# --------------------------------------------------------------------------
# The adapter between mergekit's tensor groups and the pure kernels.


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class PaperMergeMethod(GroupMergeMethod):
    """A paper method as a mergekit method (base required, one group at a time)."""

    __mergekit_mllm__ = True

    def __init__(self, declaration: MethodDeclaration):
        self.declaration = declaration
        self.spec = MergeMethodSpec(
            name=declaration.name,
            pretty_name=declaration.pretty_name,
            reference_url=declaration.reference_url,
            parameters=(LAMBDA, WEIGHT) + declaration.parameters,
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
            # An optional tensor (e.g. an untied lm_head) present only in the
            # base is kept as it is.
            optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "<unnamed tensor>"
        base = group.base.tensor
        weights = parameters.pop("weight")
        # Exact τᵢ = scaling·B·A of LoRA experts (mergekit_mllm.lora); empty otherwise.
        lora_factors = lora_inputs.task_vector_factors(group, compute_dtype(base.dtype))
        if self.spec.name in streaming.STREAMING_METHODS and not lora_factors and self._streamable(group):
            return self.merge_streaming(group, weights, parameters)
        task_vectors = self.task_vectors(group, weights, lora_factors)
        scale = parameters.pop("lambda")
        if self.declaration.matrix_only and (task_vectors.ndim != 3 or group.metadata.vocabulary_axis is not None):
            merged = task_vectors.mean(dim=0)
        else:
            if "rank_fraction" in parameters:
                parameters["rank_fraction"] = _rank_fraction(parameters, len(task_vectors))
            parameters.update(self.declaration.context(group, len(task_vectors)))
            # All experts LoRA: the method's low-rank kernel (no dense SVD), if it has one.
            low_rank = lora_inputs.low_rank_merge(self.spec.name, group, weights, lora_factors)
            merged = low_rank(**parameters) if low_rank else self.declaration.kernel(task_vectors, **parameters)
        result = base.to(task_vectors.dtype) + scale * merged
        if not torch.isfinite(result).all():
            raise FloatingPointError(
                f"{self.spec.name}: the merged tensor {name} contains NaN or Inf; "
                "nothing was written. Lower lr/lambda or check the inputs."
            )
        return result.to(base.dtype)

    @staticmethod
    def _streamable(group: TensorGroup) -> bool:
        base = group.base.tensor
        return all(
            e.tensor.shape == base.shape and e.tensor.device == base.device and e.tensor.dtype == base.dtype
            for e in group.non_base
        )

    def merge_streaming(self, group: TensorGroup, weights, parameters: Dict[str, Any]) -> torch.Tensor:
        """Element-wise methods chunk by chunk from the inputs (mergekit_mllm.ops.streaming):
        the dense kernels' numbers without N float32 copies of the weight."""
        name = group.metadata.name or "<unnamed tensor>"
        entries = group.non_base
        try:
            return streaming.merge(
                self.spec.name, group.base.tensor, [e.tensor for e in entries], [weights[e.id] for e in entries],
                scale=parameters["lambda"], dtype=compute_dtype(group.base.tensor.dtype), name=name,
                density=parameters.get("density", 1.0), drop_rate=parameters.get("drop_rate", 0.0),
                seed=parameters.get("seed", 0), tensor_name=group.metadata.name,
            )
        except streaming.NonFiniteInput as error:
            if error.index < 0:
                raise MergeInputError(f"{self.spec.name}: base model tensor {name} contains NaN or Inf") from None
            raise MergeInputError(
                f"{self.spec.name}: tensor {name} of model {entries[error.index].id} contains NaN or Inf"
            ) from None
        except FloatingPointError:
            raise FloatingPointError(
                f"{self.spec.name}: the merged tensor {name} contains NaN or Inf; "
                "nothing was written. Lower lr/lambda or check the inputs."
            ) from None

    def task_vectors(self, group: TensorGroup, weights, lora_factors=None) -> torch.Tensor:
        """τᵢ = weightᵢ·(expertᵢ − base) in the compute dtype, with input checks
        (for a LoRA expert in ``lora_factors``: weightᵢ·L·R, exactly)."""
        name = group.metadata.name or "<unnamed tensor>"
        dtype = compute_dtype(group.base.tensor.dtype)
        base = group.base.tensor.to(dtype)
        if not torch.isfinite(base).all():
            raise MergeInputError(f"{self.spec.name}: base model tensor {name} contains NaN or Inf")
        vectors = []
        for entry in group.non_base:
            if lora_factors and entry.id in lora_factors:
                source = vector = lora_factors[entry.id].dense()
            else:
                source = entry.tensor.to(dtype)
                vector = source - base
            if not torch.isfinite(source).all():
                raise MergeInputError(f"{self.spec.name}: tensor {name} of model {entry.id} contains NaN or Inf")
            vectors.append(vector * weights[entry.id])
        return torch.stack(vectors)


METHODS: Tuple[PaperMergeMethod, ...] = tuple(PaperMergeMethod(d) for d in DECLARATIONS)
METHOD_NAMES: Tuple[str, ...] = tuple(m.spec.name for m in METHODS)


def register_all() -> None:
    """Register every method with mergekit; calling it again changes nothing."""
    from mergekit import merge_methods

    for method in METHODS:
        try:
            existing = merge_methods.get(method.spec.name)
        except RuntimeError:
            merge_methods.register(method)
            continue
        if not getattr(existing, "__mergekit_mllm__", False):
            raise RuntimeError(
                f"a different merge method named {method.spec.name!r} is already registered with mergekit"
            )


# Importing this module registers the methods (the import hook normally does it
# first; this covers ``import mergekit_mllm.methods`` before mergekit).
register_all()
