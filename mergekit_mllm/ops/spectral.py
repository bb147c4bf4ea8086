"""SVD-based methods: Task Singular Vectors (TSV) and isotropic merging (Iso).

All functions take 2-D task vectors ``(N, m, n)``; the method layer routes
other tensors to the mean (as the authors' code does).
"""

from __future__ import annotations

from typing import Tuple

import torch


def truncated_svd(matrix: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets ``(U_k, S_k, Vh_k)`` of one matrix."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank, :]


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``matrix = P S Qᵀ``.

    The nearest matrix with orthonormal columns (rows for wide inputs); TSV and
    Iso-CTS use it to decorrelate the concatenated singular vectors.
    """
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def rank_per_task(shape: Tuple[int, ...], rank_fraction: float) -> int:
    """k = ⌊min(m, n)·rank_fraction⌋ (the shape's rank, not the numerical rank)."""
    return int(min(shape) * rank_fraction)


def tsv(task_vectors: torch.Tensor, *, rank_fraction: float) -> torch.Tensor:
    """Task Singular Vectors: keep the top-k triplets of each task vector,
    concatenate them, orthogonalise U and Vᵀ by their polar factors and
    reassemble ``U⊥ diag(S) V⊥ᵀ``.

    The reference code pads the concatenation to min(m, n) columns with zeros;
    the zero columns do not change the polar factor of the non-zero block, so
    only the ``N·k`` populated columns are formed here.
    """
    k = rank_per_task(task_vectors.shape[1:], rank_fraction)
    if k == 0:
        return torch.zeros_like(task_vectors[0])
    us, ss, vhs = zip(*(truncated_svd(tv, k) for tv in task_vectors))
    u_cat = torch.cat(us, dim=1)  # m × N·k
    s_cat = torch.cat(ss)  # N·k
    vh_cat = torch.cat(vhs, dim=0)  # N·k × n
    return (polar_factor(u_cat) * s_cat) @ polar_factor(vh_cat)


def iso_c(task_vectors: torch.Tensor) -> torch.Tensor:
    """Iso-C: SVD of Σ τᵢ with every singular value set to their mean."""
    u, s, vh = torch.linalg.svd(task_vectors.sum(dim=0), full_matrices=False)
    return (u * s.mean()) @ vh


def common_space_size(rank: int, num_tasks: int, common_space_fraction: float) -> int:
    """Iso-CTS common-subspace size: ⌊r·fraction⌋, adjusted so that the
    remaining ``r − size`` dimensions split evenly across the tasks."""
    common = int(rank * common_space_fraction)
    task_specific_total = round((rank - common) / num_tasks) * num_tasks
    return rank - task_specific_total


def iso_cts(task_vectors: torch.Tensor, *, common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS: common subspace of Σ τᵢ plus per-task subspaces of the residuals
    (τᵢ with the common left subspace projected out), orthogonalised by polar
    factors, with an isotropic spectrum (all singular values = their mean)."""
    num_tasks = task_vectors.shape[0]
    rank = min(task_vectors.shape[1:])
    common = common_space_size(rank, num_tasks, common_space_fraction)
    per_task = (rank - common) // num_tasks
    u, s, vh = torch.linalg.svd(task_vectors.sum(dim=0), full_matrices=False)
    u_common, s_common, vh_common = u[:, :common], s[:common], vh[:common, :]

    us, ss, vhs = [], [], []
    for task_vector in task_vectors:
        residual = task_vector - u_common @ (u_common.T @ task_vector)
        u_t, s_t, vh_t = truncated_svd(residual, per_task)
        us.append(u_t)
        ss.append(s_t)
        vhs.append(vh_t)
    # Task-specific blocks first, then the common block, as in the reference.
    u_all = torch.cat(us + [u_common], dim=1)
    s_all = torch.cat(ss + [s_common])
    vh_all = torch.cat(vhs + [vh_common], dim=0)
    return (polar_factor(u_all) * s_all.mean()) @ polar_factor(vh_all)
