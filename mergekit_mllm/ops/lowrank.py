"""The paper's SVD and interference methods on low-rank task vectors (LoRA experts).

A LoRA expert changes a weight by τ = L·R (L = scaling·B is m×r, R = A is
r×n, r ≪ min(m, n)). Every SVD the methods take of such a τ, of a sum of
several or of a difference from their mean, is the SVD of one product of
stacked factors, obtained exactly from QR decompositions of the two factors
and the SVD of the small core between them (:func:`low_rank_svd`): cost
O((m + n)·r²) instead of O(m·n·min(m, n)), and no dense SVD at all.

The kernels (:data:`LOW_RANK_KERNELS`: TSV, Iso-C, Iso-CTS, WUDI, OptMerge
and the exact minimisers of WUDI/OptMerge) take a list of :class:`LowRank`
task vectors (already scaled by the per-model weights) with the same keyword
arguments as their dense counterparts in :mod:`mergekit_mllm.ops` and return
the dense merged τ_m. WUDI and OptMerge use thin input projectors (rᵢ rows
instead of m, the same objective), so the Gram/factor machinery of
:mod:`~mergekit_mllm.ops.interference` works on a Σrᵢ-wide factor.

Where the dense method is well defined they give its answer (to float
rounding). Where it is not — TSV with k above an expert's rank, Iso-C and
Iso-CTS of a rank-deficient sum — the dense answer contains singular vectors
of zero singular values, i.e. an arbitrary orthonormal completion picked by
LAPACK from rounding noise, which then carries weight (Iso flattens the
spectrum, TSV's polar factor mixes those columns into the real ones). The
low-rank forms keep only the well-defined part: zero singular triplets are
dropped, and Iso's isotropic scale keeps the dense normalisation (Σσ over
min(m, n)), so Iso-C here equals the dense result projected onto the row and
column spaces of Σ τᵢ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

import torch

from mergekit_mllm.ops.closed_form import initial_merge, interference_minimiser
from mergekit_mllm.ops.interference import DEFAULT_LR, InterferenceProblem, run_interference_descent
from mergekit_mllm.ops.spectral import common_space_size, polar_factor, rank_per_task


@dataclass(frozen=True)
class LowRank:
    """τ = left @ right (m×r times r×n); r may be 0 (an untouched weight)."""

    left: torch.Tensor  # m × r
    right: torch.Tensor  # r × n

    def __post_init__(self):
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(
                f"LowRank factors must be m×r and r×n; got {tuple(self.left.shape)} and {tuple(self.right.shape)}"
            )

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        """The inner dimension r (an upper bound of the numerical rank)."""
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def scaled(self, factor: float) -> "LowRank":
        return LowRank(self.left * factor, self.right)

    def to(self, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.left.to(dtype), self.right.to(dtype))

    def squared_norm(self) -> torch.Tensor:
        """‖L R‖²_F = ⟨LᵀL, R Rᵀ⟩ from two r×r Gram matrices."""
        return ((self.left.T @ self.left) * (self.right @ self.right.T)).sum()


def low_rank_sum(terms: Sequence[LowRank], coefficients: Optional[Sequence[float]] = None) -> LowRank:
    """Σ cᵢ·τᵢ as one product of the stacked factors [c₁L₁ … c_N L_N]·[R₁; …; R_N]."""
    coefficients = [1.0] * len(terms) if coefficients is None else list(coefficients)
    return LowRank(
        torch.cat([term.left * c for term, c in zip(terms, coefficients)], dim=1),
        torch.cat([term.right for term in terms], dim=0),
    )


def _default_tolerance(term: LowRank, largest: torch.Tensor) -> float:
    # numpy's matrix_rank rule for the full m×n matrix the factors stand for.
    return float(largest) * max(term.shape) * torch.finfo(term.left.dtype).eps


def low_rank_svd(
    term: LowRank, rank: Optional[int] = None, *, tolerance: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``(U, S, Vh)`` of ``L R`` without forming it.

    With L = Q_L T_L and Rᵀ = Q_R T_R (reduced QR), L R = Q_L (T_L T_Rᵀ) Q_Rᵀ,
    so the SVD of the small core T_L T_Rᵀ gives it: U = Q_L U_c, V = Q_R V_c.
    Singular values at or below ``tolerance`` (default: numpy's rank rule,
    σ_max·max(m, n)·ε) are zero in exact arithmetic and are dropped; at most
    ``rank`` triplets are returned.
    """
    q_left, t_left = torch.linalg.qr(term.left)
    q_right, t_right = torch.linalg.qr(term.right.T)
    u_core, s, vh_core = torch.linalg.svd(t_left @ t_right.T, full_matrices=False)
    if s.numel() == 0:
        keep = 0
    else:
        threshold = _default_tolerance(term, s[0]) if tolerance is None else tolerance
        keep = int((s > threshold).sum())
    if rank is not None:
        keep = min(keep, rank)
    return q_left @ u_core[:, :keep], s[:keep], vh_core[:keep] @ q_right.T


def _zeros(task_vectors: Sequence[LowRank]) -> torch.Tensor:
    first = task_vectors[0]
    return first.left.new_zeros(first.shape)


def _isotropic(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, count: int) -> torch.Tensor:
    """polar(U)·(Σσ / count)·polar(Vh): Iso's flat spectrum over ``count`` dense ranks."""
    return (polar_factor(u) * (s.sum() / count)) @ polar_factor(vh)


# --------------------------------------------------------------------------
# The SVD-based methods.


def tsv(task_vectors: Sequence[LowRank], *, rank_fraction: float) -> torch.Tensor:
    """Task Singular Vectors from the factors: the top-k triplets of each τᵢ
    (at most its rank: triplets of zero singular values carry nothing),
    concatenated, U and Vᵀ orthogonalised by their polar factors."""
    k = rank_per_task(task_vectors[0].shape, rank_fraction)
    triplets = [low_rank_svd(tv, k) for tv in task_vectors] if k > 0 else []
    if not triplets or sum(s.numel() for _, s, _ in triplets) == 0:
        return _zeros(task_vectors)
    us, ss, vhs = zip(*triplets)
    return (polar_factor(torch.cat(us, dim=1)) * torch.cat(ss)) @ polar_factor(torch.cat(vhs, dim=0))


def iso_c(task_vectors: Sequence[LowRank]) -> torch.Tensor:
    """Iso-C: Σ τᵢ = U S Vᵀ (exact, from the stacked factors) → mean(S)·U Vᵀ,
    the mean taken over all min(m, n) singular values as in the dense form."""
    u, s, vh = low_rank_svd(low_rank_sum(task_vectors))
    if s.numel() == 0:
        return _zeros(task_vectors)
    return (u * (s.sum() / min(task_vectors[0].shape))) @ vh  # U, Vᵀ are their own polar factors


def iso_cts(task_vectors: Sequence[LowRank], *, common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS: the common subspace of Σ τᵢ plus each τᵢ's residual subspace,
    all from factors (a residual τᵢ − U_c U_cᵀ τᵢ = (Lᵢ − U_c U_cᵀ Lᵢ)·Rᵢ stays
    a product), polar-orthogonalised, with the isotropic spectrum."""
    num_tasks = len(task_vectors)
    rank = min(task_vectors[0].shape)
    common = common_space_size(rank, num_tasks, common_space_fraction)
    per_task = (rank - common) // num_tasks
    u_common, s_common, vh_common = low_rank_svd(low_rank_sum(task_vectors), common)

    def residual_triplets(task_vector: LowRank):
        residual = LowRank(task_vector.left - u_common @ (u_common.T @ task_vector.left), task_vector.right)
        # Relative to τᵢ itself: a residual that is zero up to rounding has no rank.
        tolerance = _default_tolerance(task_vector, task_vector.squared_norm().sqrt())
        return low_rank_svd(residual, per_task, tolerance=tolerance)

    # Task-specific blocks first, then the common block, as in the dense form.
    us, ss, vhs = zip(*[residual_triplets(tv) for tv in task_vectors], (u_common, s_common, vh_common))
    u_all, s_all, vh_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    if s_all.numel() == 0:
        return _zeros(task_vectors)
    return _isotropic(u_all, s_all, vh_all, common + num_tasks * per_task)


# --------------------------------------------------------------------------
# The interference objective (WUDI, OptMerge) with thin input projectors.


def input_projector(task_vector: LowRank) -> torch.Tensor:
    """P (r×n) with PᵀP = τᵀτ: for L = Q T (QR), τ = Q·(T R) and Q has
    orthonormal columns, so ‖X τᵀ‖ = ‖X (T R)ᵀ‖ for every X — WUDI's loss
    term with an r-row projector instead of the m-row τ."""
    _, t_left = torch.linalg.qr(task_vector.left)
    return t_left @ task_vector.right


def _active(task_vectors: Sequence[LowRank]) -> List[Tuple[LowRank, float]]:
    """(τᵢ, ‖τᵢ‖²) of experts that changed this weight.

    An untouched weight (a LoRA expert that does not target it) has the term
    0/0 in the authors' loss; its true contribution is zero.
    """
    pairs = [(tv, float(tv.squared_norm())) for tv in task_vectors]
    return [(tv, norm) for tv, norm in pairs if norm > 0.0]


def _sum_dense(task_vectors: Sequence[LowRank]) -> torch.Tensor:
    return low_rank_sum(task_vectors).dense()


def wudi_problem(task_vectors: Sequence[LowRank]) -> InterferenceProblem:
    """WUDI: targets τᵢ, thin projectors (rᵢ×n, same loss as τᵢ itself), init Σ τᵢ."""
    active = _active(task_vectors)
    return InterferenceProblem(
        targets=[tv.dense() for tv, _ in active],
        projectors=[input_projector(tv) for tv, _ in active],
        weights=[1.0 / norm for _, norm in active],
        init=_sum_dense(task_vectors),
    )


def optmerge_problem(
    task_vectors: Sequence[LowRank], *, variant: Literal["lora", "full"], rank_fraction: float
) -> InterferenceProblem:
    """OptMerge's low-rank denoised targets and Σ_k V_kᵀ projectors, every
    truncated SVD taken exactly from factors (k above the rank keeps all)."""
    num_tasks = len(task_vectors)
    mean = low_rank_sum(task_vectors, [1.0 / num_tasks] * num_tasks)
    mean_dense = mean.dense()
    k = rank_per_task(task_vectors[0].shape, rank_fraction)
    targets, projectors, weights = [], [], []
    for task_vector, norm in _active(task_vectors):
        u, s, vh = low_rank_svd(task_vector, k)
        projectors.append(s[:, None] * vh)
        if variant == "lora":
            targets.append((u * s) @ vh)
        else:
            u_c, s_c, vh_c = low_rank_svd(low_rank_sum([task_vector, mean], [1.0, -1.0]), k)
            targets.append((u_c * s_c) @ vh_c + mean_dense)
        weights.append(1.0 / norm)
    init = mean_dense if variant == "lora" else mean_dense * num_tasks
    return InterferenceProblem(targets=targets, projectors=projectors, weights=weights, init=init)


def wudi(task_vectors: Sequence[LowRank], *, iterations: int, lr: float) -> torch.Tensor:
    return run_interference_descent(wudi_problem(task_vectors), optimizer="adam", lr=lr, iterations=iterations)


def optmerge(
    task_vectors: Sequence[LowRank],
    *,
    variant: Literal["lora", "full"],
    rank_fraction: float,
    iterations: int,
    lr: Optional[float] = None,
    momentum: float = 0.9,
) -> torch.Tensor:
    problem = optmerge_problem(task_vectors, variant=variant, rank_fraction=rank_fraction)
    lr = DEFAULT_LR[variant] if lr is None else lr
    if variant == "lora":
        return run_interference_descent(problem, optimizer="sgd", lr=lr, iterations=iterations, momentum=momentum)
    return run_interference_descent(problem, optimizer="adam", lr=lr, iterations=iterations)


def _with_init(problem: InterferenceProblem, task_vectors: Sequence[LowRank], init_mode: Optional[str]):
    if init_mode is None:
        return problem
    return replace(problem, init=initial_merge(torch.stack([tv.dense() for tv in task_vectors]), init_mode))


def wudi_exact(
    task_vectors: Sequence[LowRank], *, init_mode: str = "sum", rcond: Optional[float] = None, ridge: float = 0.0
) -> torch.Tensor:
    """WUDI's exact minimiser (:func:`~mergekit_mllm.ops.closed_form.wudi_exact`) with thin
    projectors: C = BBᵀ has rank ≤ Σ rᵢ, so its spectrum comes from a Σrᵢ × Σrᵢ eigenproblem."""
    problem = _with_init(wudi_problem(task_vectors), task_vectors, init_mode)
    return interference_minimiser(problem, rcond=rcond, ridge=ridge)


def optmerge_exact(
    task_vectors: Sequence[LowRank],
    *,
    variant: Literal["lora", "full"],
    rank_fraction: float,
    init_mode: Optional[str] = None,
    rcond: Optional[float] = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """OptMerge's exact minimiser (:func:`~mergekit_mllm.ops.closed_form.optmerge_exact`) from factors."""
    problem = optmerge_problem(task_vectors, variant=variant, rank_fraction=rank_fraction)
    return interference_minimiser(_with_init(problem, task_vectors, init_mode), rcond=rcond, ridge=ridge)


# Method name (as registered with mergekit) -> low-rank kernel. Methods not
# listed (element-wise ones, SWUDI/ASWUDI) get the exact dense τᵢ = L·R.
LOW_RANK_KERNELS: Dict[str, Callable[..., torch.Tensor]] = {
    "tsv": tsv,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "wudi": wudi,
    "optmerge": optmerge,
    "wudi_exact": wudi_exact,
    "optmerge_exact": optmerge_exact,
}
