"""Closed-form solutions of the interference objective (no iterations).

The WUDI/OptMerge objective ``L(τ) = Σᵢ wᵢ‖(τ − Tᵢ)Pᵢᵀ‖²`` is quadratic, with
``∇L = 2(τC − D)``, C = Σ wᵢPᵢᵀPᵢ = V diag(ℓ) Vᵀ, D = Σ wᵢTᵢPᵢᵀPᵢ. Every
answer below is a *spectral filter* F(ℓ) ∈ [0, 1] applied from the initial
point τ₀ (PAPER.md §3.4 "Derived view", §3.7):

    τ = τ₀(I − V F Vᵀ) + D V diag(F/ℓ) Vᵀ  =  τ₀ − R V diag(F/ℓ) Vᵀ,   R = τ₀C − D.

F = 1 moves a direction all the way to the minimiser, F = 0 leaves τ₀ there:

* :func:`interference_minimiser` / :func:`wudi_exact` / :func:`optmerge_exact`:
  F = 1 on every direction C sees, i.e. the exact minimiser
  ``τ₀(I − CC⁺) + DC⁺`` (the minimiser nearest τ₀; ``D C⁺`` itself for
  ``init_mode='zero'``), which is also where gradient flow from τ₀ ends.
* :func:`swudi` (the authors' follow-up, "Closed-Form Spectral Regularization
  for Multi-Task Model Merging"): F = 1 − exp(−t·ℓ), the gradient flow of
  ``L/2`` stopped at time t, on the top ⌈n·ratio⌉ eigenvalues only;
  ``filter_type='none'`` gives hard rank truncation (F = 1 on the top K).
* :func:`aswudi`: hard truncation with K chosen per weight from the spectrum
  (:func:`adaptive_rank`: participation ratio of √ℓ by default, or
  Gavish–Donoho, stable rank, entropy, cumulative variance).

Numerical zero: eigenvalues at or below ``max(1e-8, rcond·ℓ_max)`` (``rcond``
defaults to n·ε of the compute dtype, numpy's ``matrix_rank`` rule) are
directions C does not see; they keep τ₀. The authors' code instead clamps
them to 1e-8 and filters them too; with the exponential filter the two agree
to ~t·1e-8, and a hard filter reaches them only if K exceeds the rank of C.

Pure tensor functions; everything stays on the input device.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, Optional, Tuple

import torch

from mergekit_mllm.ops.interference import (
    InterferenceProblem,
    InterferenceSpectrum,
    interference_spectrum,
    optmerge_problem,
    wudi_problem,
)

InitMode = Literal["sum", "mean", "zero"]
FilterType = Literal["exponential", "none"]

INIT_MODES = ("sum", "mean", "zero")
FILTER_TYPES = ("exponential", "none")
RANK_RULES = ("participation_sqrt", "participation", "stable_rank", "entropy", "gavish_donoho", "cumvar_<fraction>")

# The authors' clamp on the eigenvalues of C (scale-free: tr C ≤ N).
MIN_EIGENVALUE = 1e-8


def initial_merge(task_vectors: torch.Tensor, init_mode: InitMode) -> torch.Tensor:
    """τ₀: Σ τᵢ (``sum``), mean τᵢ (``mean``) or 0 (``zero``)."""
    if init_mode == "sum":
        return task_vectors.sum(dim=0)
    if init_mode == "mean":
        return task_vectors.mean(dim=0)
    if init_mode == "zero":
        return torch.zeros_like(task_vectors[0])
    raise ValueError(f"unknown init_mode {init_mode!r}; expected one of {INIT_MODES}")


def _with_init(problem: InterferenceProblem, task_vectors: torch.Tensor, init_mode: Optional[InitMode]):
    return problem if init_mode is None else replace(problem, init=initial_merge(task_vectors, init_mode))


def numerical_zero(spectrum: InterferenceSpectrum, rcond: Optional[float] = None) -> torch.Tensor:
    """The eigenvalue at or below which a direction counts as unseen by C."""
    if rcond is None:
        rcond = spectrum.num_columns * torch.finfo(spectrum.eigenvalues.dtype).eps
    largest = spectrum.eigenvalues.max() if spectrum.eigenvalues.numel() else spectrum.eigenvalues.new_zeros(())
    return torch.clamp(rcond * largest, min=MIN_EIGENVALUE)


def filtered_solution(
    spectrum: InterferenceSpectrum, response: torch.Tensor, *, rcond: Optional[float] = None
) -> torch.Tensor:
    """τ₀ − R V diag(F/ℓ) Vᵀ for the filter values F (one per stored eigenvalue)."""
    eigenvalues = spectrum.eigenvalues
    seen = eigenvalues > numerical_zero(spectrum, rcond)
    safe = torch.where(seen, eigenvalues, torch.ones_like(eigenvalues))
    return spectrum.update(torch.where(seen, -response / safe, torch.zeros_like(eigenvalues)))


def exponential_response(eigenvalues: torch.Tensor, exp_time: float) -> torch.Tensor:
    """F = 1 − exp(−t·ℓ): gradient flow of L/2 for time t from τ₀."""
    return -torch.expm1(-exp_time * eigenvalues.clamp(min=0))


def top_eigenvalue_mask(eigenvalues: torch.Tensor, rank: torch.Tensor | int) -> torch.Tensor:
    """1 on the ``rank`` largest of the ascending ``eigenvalues``, 0 elsewhere."""
    position_from_top = torch.arange(eigenvalues.numel() - 1, -1, -1, device=eigenvalues.device)
    return (position_from_top < rank).to(eigenvalues.dtype)


def interference_minimiser(
    problem: InterferenceProblem, *, rcond: Optional[float] = None, ridge: float = 0.0
) -> torch.Tensor:
    """The exact minimiser nearest ``problem.init``: τ₀(I − CC⁺) + DC⁺.

    ``ridge`` ρ > 0 instead minimises L(τ) + ρ‖τ − τ₀‖² (filter F = ℓ/(ℓ + ρ)),
    which bounds the answer where C is ill-conditioned. ℓ is scale-free
    (tr C ≤ N), so ρ is an absolute eigenvalue scale.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be ≥ 0; got {ridge}")
    spectrum = interference_spectrum(problem)
    eigenvalues = spectrum.eigenvalues
    response = eigenvalues.clamp(min=0) / (eigenvalues.clamp(min=0) + ridge) if ridge > 0 else torch.ones_like(eigenvalues)
    return filtered_solution(spectrum, response, rcond=rcond)


def wudi_exact(
    task_vectors: torch.Tensor, *, init_mode: InitMode = "sum", rcond: Optional[float] = None, ridge: float = 0.0
) -> torch.Tensor:
    """The exact minimiser of WUDI's objective (the point Adam heads for).

    C = Σ τᵢᵀτᵢ/‖τᵢ‖² is usually full rank for N·m ≥ n, and then the answer is
    DC⁻¹ whatever ``init_mode``; otherwise τ₀ (Σ τᵢ by default) is kept in
    the directions no expert uses. ``ridge``: see :func:`interference_minimiser`.
    """
    problem = _with_init(wudi_problem(task_vectors), task_vectors, init_mode)
    return interference_minimiser(problem, rcond=rcond, ridge=ridge)


def optmerge_exact(
    task_vectors: torch.Tensor,
    *,
    variant: Literal["lora", "full"],
    rank_fraction: float,
    init_mode: Optional[InitMode] = None,
    rcond: Optional[float] = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """The exact minimiser of OptMerge's objective (truncated targets and
    projectors; ``variant`` as in :func:`~mergekit_mllm.ops.interference.optmerge`).

    C has rank ≤ N·k ≈ min(m, n): with the default k = ⌊min(m, n)/N⌋ the
    system is nearly square, so the minimiser interpolates every expert's
    projected target and its norm can be many times ‖τᵢ‖ where the experts'
    subspaces are oblique (the growth §4.2 warns about); ``ridge`` bounds it.
    Directions C does not see keep τ₀ (default: the variant's own init, mean
    for ``lora``, sum for ``full``). 300 SGD steps at lr 1e-4 stop far from
    this point (§3.4): it is the limit, not a replacement, of OptMerge ``lora``.
    """
    problem = _with_init(
        optmerge_problem(task_vectors, variant=variant, rank_fraction=rank_fraction), task_vectors, init_mode
    )
    return interference_minimiser(problem, rcond=rcond, ridge=ridge)


# --------------------------------------------------------------------------
# SWUDI / ASWUDI.


def descending_spectrum(spectrum: InterferenceSpectrum) -> torch.Tensor:
    """All n eigenvalues of C, largest first, clamped at 1e-8 as the authors do
    (the ones a factor-space decomposition does not store are zero)."""
    stored = spectrum.eigenvalues.flip(0)
    missing = spectrum.num_columns - stored.numel()
    padded = torch.cat([stored, stored.new_zeros(missing)]) if missing > 0 else stored
    return padded.clamp(min=MIN_EIGENVALUE)


def truncation_rank(num_eigenvalues: int, truncate_rank_ratio: float) -> int:
    """K = ⌈n·ratio⌉ (the authors' ``int(n·r + 0.999)``), at least 1."""
    return max(1, int(math.floor(num_eigenvalues * truncate_rank_ratio + 0.999)))


def swudi(
    task_vectors: torch.Tensor,
    *,
    exp_time: float = 300.0,
    truncate_rank_ratio: Optional[float] = 0.65,
    filter_type: FilterType = "exponential",
    init_mode: InitMode = "sum",
) -> torch.Tensor:
    """SWUDI: WUDI's objective solved by a spectral filter in closed form.

    F = 1 − exp(−t·ℓ) (``filter_type='exponential'``) or 1 (``'none'``: hard
    rank truncation), kept only on the top K = ⌈n·ratio⌉ eigenvalues of C
    (``truncate_rank_ratio=None``: all). Defaults are the released ones
    (t 300, ratio 0.65: the CLIP optimum; the authors recommend ratio 0.85 for
    LLM/VLM deltas). With the sum init the merged vector is ~N×τᵢ: use
    λ ≈ 1/N (λ 1.0 "collapses MLLM outputs").
    """
    _check_choice("filter_type", filter_type, FILTER_TYPES)
    problem = _with_init(wudi_problem(task_vectors), task_vectors, init_mode)
    spectrum = interference_spectrum(problem)
    eigenvalues = spectrum.eigenvalues
    if filter_type == "exponential":
        response = exponential_response(eigenvalues, exp_time)
    else:
        response = torch.ones_like(eigenvalues)
    if truncate_rank_ratio is not None:
        rank = truncation_rank(spectrum.num_columns, truncate_rank_ratio)
        response = response * top_eigenvalue_mask(eigenvalues, rank)
    return filtered_solution(spectrum, response)


def adaptive_rank(
    eigenvalues_desc: torch.Tensor,
    shape: Tuple[int, int],
    method: str = "participation_sqrt",
    *,
    min_rank: int = 1,
    max_rank_ratio: float = 1.0,
) -> torch.Tensor:
    """ASWUDI's per-weight rank K from the n eigenvalues of C, largest first.

    ``participation_sqrt`` ⌈(Σ√ℓ)²/Σℓ⌉ (default), ``participation``
    ⌈(Σℓ)²/Σℓ²⌉, ``stable_rank`` ⌈Σℓ²/ℓ₁²⌉, ``entropy`` ⌈exp H(ℓ/Σℓ)⌉,
    ``cumvar_<f>`` the fewest eigenvalues holding a fraction f of Σℓ, and
    ``gavish_donoho``: the count of √ℓ above ω(β)·median √ℓ, β = min/max of
    the weight's shape, with the released code's ω(β) = λ*(β)/√μ_β where
    λ*(β) = √(2(β+1) + 8β/(β+1+√(β²+14β+1))) and μ_β ≈ (1−β)²+β (2+√3 for a
    square weight) stands in for the Marchenko–Pastur median (so ω(1) ≈ 1.19
    here, not the textbook 2.858). Clipped to [min_rank, round(max_rank_ratio·n)].
    Returns a 0-d integer tensor on the eigenvalues' device (no host sync).
    """
    ell = eigenvalues_desc
    tiny = torch.finfo(ell.dtype).tiny
    if method == "participation_sqrt":
        roots = ell.sqrt()
        rank = torch.ceil(roots.sum().square() / roots.square().sum().clamp(min=tiny))
    elif method == "participation":
        rank = torch.ceil(ell.sum().square() / ell.square().sum().clamp(min=tiny))
    elif method == "stable_rank":
        rank = torch.ceil(ell.square().sum() / ell[0].square().clamp(min=tiny))
    elif method == "entropy":
        shares = (ell / ell.sum().clamp(min=tiny)).clamp(min=tiny)
        rank = torch.ceil(torch.exp(-(shares * shares.log()).sum()))
    elif method == "gavish_donoho":
        rank = _gavish_donoho_rank(ell, shape)
    elif method.startswith("cumvar_"):
        fraction = _cumvar_fraction(method)
        cumulative = ell.cumsum(0) / ell.sum().clamp(min=tiny)
        rank = (cumulative < fraction).sum() + 1
    else:
        raise ValueError(f"unknown auto_rank_method {method!r}; expected one of {RANK_RULES}")
    largest = max(min_rank, int(round(max_rank_ratio * ell.numel())))
    return rank.to(torch.int64).clamp(min=min_rank, max=largest)


def _cumvar_fraction(method: str) -> float:
    try:
        fraction = float(method.split("_", 1)[1])
    except ValueError:
        raise ValueError(f"auto_rank_method {method!r}: expected cumvar_<fraction>, e.g. cumvar_0.9") from None
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"auto_rank_method {method!r}: the fraction must be in (0, 1]")
    return fraction


def _gavish_donoho_rank(ell: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    beta = min(shape) / max(shape)
    if beta < 0.9999:
        median_scale = math.sqrt(max((1.0 - beta) ** 2 + beta, 1e-3))
    else:
        median_scale = math.sqrt(2.0 + math.sqrt(3.0))
    optimal = math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta * beta + 14.0 * beta + 1.0)))
    omega = optimal / max(median_scale, 1e-3)
    singular_values = ell.sqrt()
    threshold = omega * singular_values.median().clamp(min=torch.finfo(ell.dtype).tiny)
    return (singular_values > threshold).sum().clamp(min=1)


def aswudi(
    task_vectors: torch.Tensor,
    *,
    auto_rank_method: str = "participation_sqrt",
    min_rank: int = 1,
    max_rank_ratio: float = 1.0,
    filter_type: FilterType = "none",
    exp_time: float = 1e6,
    init_mode: InitMode = "sum",
) -> torch.Tensor:
    """ASWUDI: SWUDI with the rank K picked per weight by :func:`adaptive_rank`.

    Default: hard truncation (F = 1 on the top K) with the participation
    ratio of √ℓ; the authors suggest ``gavish_donoho`` for full-parameter
    LLM/VLM deltas and λ ≈ 1/N with the sum init (README: Qwen 0.2, InternVL 0.1).
    """
    _check_choice("filter_type", filter_type, FILTER_TYPES)
    problem = _with_init(wudi_problem(task_vectors), task_vectors, init_mode)
    spectrum = interference_spectrum(problem)
    eigenvalues = spectrum.eigenvalues
    rank = adaptive_rank(
        descending_spectrum(spectrum),
        tuple(task_vectors.shape[1:]),
        auto_rank_method,
        min_rank=min_rank,
        max_rank_ratio=max_rank_ratio,
    )
    if filter_type == "exponential":
        response = exponential_response(eigenvalues, exp_time)
    else:
        response = torch.ones_like(eigenvalues)
    return filtered_solution(spectrum, response * top_eigenvalue_mask(eigenvalues, rank))


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
