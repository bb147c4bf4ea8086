"""Element-wise methods: Weight Average, TIES, DARE and their combinations.

These follow the paper's released code (MLLMerging, Qwen2-VL script), which
differs from mergekit's built-in ``ties``/``dare_*``: trimming is per tensor
with ties kept at the threshold, the elected sign falls back to the majority
sign, the kept entries are averaged (not summed, not weight-normalised), and
DARE draws an independent Bernoulli mask per expert.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergekit_mllm.ops import counter_rng


def weight_average(task_vectors: torch.Tensor) -> torch.Tensor:
    """Weight Average (model soup): the mean task vector."""
    return task_vectors.mean(dim=0)


def trim_top_magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 (trim): keep the top ``density`` fraction of |τ| in one tensor.

    As in the TIES reference code, the threshold is the k-th smallest magnitude
    with k = ⌊numel·(1 − density)⌋ and every entry at or above it is kept, so
    ties at the threshold survive.
    """
    num_masked = int(task_vector.numel() * (1.0 - density))
    if num_masked <= 0:
        return task_vector.clone()
    magnitudes = task_vector.abs().reshape(-1)
    threshold = magnitudes.kthvalue(num_masked).values
    return task_vector * (task_vector.abs() >= threshold)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES step 2 (elect): sign of the summed trimmed vectors per entry.

    Entries whose sum is exactly zero take the majority sign, the sign of the
    sum of all elected signs.
    """
    signs = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(signs.sum())
    return torch.where(signs == 0, majority, signs)


def disjoint_mean(trimmed: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """TIES step 3 (disjoint merge): mean of the entries agreeing with ``signs``."""
    agrees = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    kept = trimmed * agrees
    count = agrees.sum(dim=0).clamp(min=1)
    return kept.sum(dim=0) / count


def ties_merging(task_vectors: torch.Tensor, *, density: float) -> torch.Tensor:
    """TIES-Merging: trim per tensor, elect sign, disjoint mean."""
    trimmed = torch.stack([trim_top_magnitude(tv, density) for tv in task_vectors])
    return disjoint_mean(trimmed, elect_sign(trimmed))


def dare_drop(
    task_vectors: torch.Tensor, *, drop_rate: float, seed: int, tensor_name: Optional[str]
) -> torch.Tensor:
    """DARE: drop each entry with probability ``drop_rate``, rescale by 1/(1−p).

    The mask comes from a counter-based generator keyed by (seed, tensor name, expert index)
    and the entry's flat position (:mod:`mergekit_mllm.ops.counter_rng`), so results do not
    depend on the device, on merge order or on how a streaming merge chunks the tensor.
    """
    if drop_rate == 0.0:
        return task_vectors.clone()
    dropped = []
    for index, task_vector in enumerate(task_vectors):
        key = counter_rng.expert_key(seed, tensor_name, index)
        keep = counter_rng.keep_mask(key, task_vector.numel(), drop_rate, device=task_vector.device)
        dropped.append(task_vector * keep.view(task_vector.shape) / (1.0 - drop_rate))
    return torch.stack(dropped)


def dare_task_arithmetic(
    task_vectors: torch.Tensor, *, drop_rate: float, seed: int, tensor_name: Optional[str]
) -> torch.Tensor:
    """TA w/ DARE: drop-and-rescale each task vector, then sum."""
    return dare_drop(task_vectors, drop_rate=drop_rate, seed=seed, tensor_name=tensor_name).sum(dim=0)


def dare_ties_merging(
    task_vectors: torch.Tensor,
    *,
    drop_rate: float,
    density: float,
    seed: int,
    tensor_name: Optional[str],
) -> torch.Tensor:
    """TIES w/ DARE: drop-and-rescale, then TIES on the result."""
    dropped = dare_drop(task_vectors, drop_rate=drop_rate, seed=seed, tensor_name=tensor_name)
    return ties_merging(dropped, density=density)
