"""The interference objective of WUDI and OptMerge, optimised the smart way.

Both methods minimise, for one 2-D weight,

    L(τ) = Σᵢ wᵢ ‖(τ − Tᵢ) Pᵢᵀ‖²_F,        wᵢ = 1/‖τᵢ‖²_F

by a first-order optimiser started at ``init``:

* WUDI (Cheng et al., ICML 2025): Tᵢ = Pᵢ = τᵢ, init Σ τᵢ, Adam.
* OptMerge ``lora`` (paper §4.2, the Qwen2-VL code): Tᵢ = rank-k truncation
  of τᵢ, Pᵢ = Σ_k V_kᵀ of τᵢ, init mean τᵢ, SGD with momentum.
* OptMerge ``full`` (paper §4.1, the InternVL code): Tᵢ = rank-k truncation of
  (τᵢ − τ̄) plus τ̄, Pᵢ from the uncentred τᵢ, init Σ τᵢ, Adam.

The authors back-propagate through N products of size m×m per step. The
gradient is ``2(τC − D)`` with ``C = Σ wᵢ PᵢᵀPᵢ`` (n×n) and
``D = Σ wᵢ Tᵢ PᵢᵀPᵢ`` (m×n), both fixed, so each step here costs one m×n×n
product (or two thin products through the factor ``B`` with ``C = BBᵀ`` when
that is cheaper) and feeds the very same ``torch.optim`` update rule: the
iterates equal the autograd formulation's up to float32 rounding.

SGD (with or without momentum) is linear, so its iterates never need to be
formed one by one: in the eigenbasis of C every direction follows its own
scalar recurrence (the "derived view" of OptMerge, PAPER.md §3.4). One
eigendecomposition then gives exactly the same T steps (:class:`InterferenceSpectrum`,
:func:`momentum_coefficients`). Adam normalises element-wise, which depends on
the basis, so it stays iterative.

Everything stays on the tensors' device: no host synchronisation happens
between building the problem and returning the merged task vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence, Union

import torch

from mergekit_mllm.ops.spectral import rank_per_task, truncated_svd

OptimizerName = Literal["adam", "sgd"]
Solver = Literal["auto", "iterative", "spectral"]


@dataclass
class InterferenceProblem:
    """``min Σᵢ wᵢ ‖(τ − Tᵢ)Pᵢᵀ‖²`` for one weight, started at ``init``."""

    targets: List[torch.Tensor]  # Tᵢ, each m × n
    projectors: List[torch.Tensor]  # Pᵢ, each kᵢ × n
    weights: Union[torch.Tensor, Sequence[float]]  # wᵢ (a 1-D tensor on the device, or floats)
    init: torch.Tensor  # m × n

    def weight_vector(self) -> torch.Tensor:
        """wᵢ as a tensor in the compute dtype on the compute device."""
        if isinstance(self.weights, torch.Tensor):
            return self.weights.to(dtype=self.init.dtype, device=self.init.device)
        return torch.tensor([float(w) for w in self.weights], dtype=self.init.dtype, device=self.init.device)

    def loss(self, merged: torch.Tensor) -> torch.Tensor:
        """The objective, evaluated straightforwardly (for tests and logs)."""
        total = merged.new_zeros(())
        for target, projector, weight in zip(self.targets, self.projectors, self.weight_vector()):
            total = total + weight * ((merged - target) @ projector.T).square().sum()
        return total

    @property
    def total_rank(self) -> int:
        """K = Σ kᵢ, the width of the factor B with C = BBᵀ."""
        return sum(projector.shape[0] for projector in self.projectors)


def interference_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """wᵢ = 1/‖τᵢ‖², and 0 for an expert that left this weight unchanged.

    Such an expert (common with LoRA experts) has the term 0/0 in the authors'
    loss, which turns the whole merge into NaN; its true contribution is zero.
    Computed on the device, without a host round-trip.
    """
    squared_norms = task_vectors.flatten(1).square().sum(dim=1)
    return torch.where(squared_norms > 0, 1.0 / squared_norms, torch.zeros_like(squared_norms))


def wudi_problem(task_vectors: torch.Tensor) -> InterferenceProblem:
    """WUDI: targets and projectors are the task vectors themselves."""
    return InterferenceProblem(
        targets=list(task_vectors),
        projectors=list(task_vectors),
        weights=interference_weights(task_vectors),
        init=task_vectors.sum(dim=0),
    )


def optmerge_problem(
    task_vectors: torch.Tensor, *, variant: Literal["lora", "full"], rank_fraction: float
) -> InterferenceProblem:
    """OptMerge: low-rank denoised targets and input-subspace projectors."""
    mean = task_vectors.mean(dim=0)
    k = rank_per_task(task_vectors.shape[1:], rank_fraction)
    targets, projectors = [], []
    for task_vector in task_vectors:
        u, s, vh = truncated_svd(task_vector, k)
        projectors.append(s[:, None] * vh)  # Σ_k V_kᵀ of the uncentred τᵢ
        if variant == "lora":
            targets.append((u * s) @ vh)
        else:
            u_c, s_c, vh_c = truncated_svd(task_vector - mean, k)
            targets.append((u_c * s_c) @ vh_c + mean)
    init = mean if variant == "lora" else task_vectors.sum(dim=0)
    return InterferenceProblem(
        targets=targets, projectors=projectors, weights=interference_weights(task_vectors), init=init
    )


# --------------------------------------------------------------------------
# The fixed quantities of the objective: C (or its factor B) and D.
#
# Costs in multiply-adds for an m×n weight, K = Σ kᵢ:
#   Gram form:   C once (n²K), then τC per step (m·n²);
#   factor form: τB then (τB)Bᵀ per step (2·m·n·K), nothing to set up.


def _factor(problem: InterferenceProblem) -> torch.Tensor:
    """B = [√w₁P₁ᵀ … √w_N P_Nᵀ] (n × K), so that C = BBᵀ."""
    roots = problem.weight_vector().sqrt()
    return torch.cat([projector.T * root for projector, root in zip(problem.projectors, roots)], dim=1)


def _projected_targets(problem: InterferenceProblem) -> torch.Tensor:
    """G = [√w₁T₁P₁ᵀ … √w_N T_N P_Nᵀ] (m × K), so that D = GBᵀ."""
    roots = problem.weight_vector().sqrt()
    return torch.cat(
        [(target @ projector.T) * root for target, projector, root in zip(problem.targets, problem.projectors, roots)],
        dim=1,
    )


def _gram_and_offset(problem: InterferenceProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """C = Σ wᵢPᵢᵀPᵢ (n×n) and D = Σ wᵢTᵢPᵢᵀPᵢ (m×n), expert by expert.

    D costs 2·m·n·kᵢ through TᵢPᵢᵀ, or m·n² through the n×n block wᵢPᵢᵀPᵢ
    that C needs anyway; the cheaper one is taken per expert (WUDI's kᵢ = m
    makes the second ~m/n times cheaper on tall weights).
    """
    n = problem.init.shape[1]
    gram = problem.init.new_zeros((n, n))
    offset = torch.zeros_like(problem.init)
    for target, projector, weight in zip(problem.targets, problem.projectors, problem.weight_vector()):
        if 2 * projector.shape[0] > n:
            block = (projector.T * weight) @ projector
            gram += block
            offset.addmm_(target, block)
            del block
        else:
            gram.addmm_(projector.T * weight, projector)
            offset.addmm_((target @ projector.T) * weight, projector)
    return gram, offset


def _use_gram_for_steps(problem: InterferenceProblem, iterations: int) -> bool:
    m, n = problem.init.shape
    k = problem.total_rank
    return n * n * k + iterations * m * n * n <= iterations * 2 * m * n * k


class _Gradient:
    """``∇L(τ) = 2(τC − D)`` from precomputed C (or its factor B) and D."""

    def __init__(self, problem: InterferenceProblem, iterations: int):
        self.factored = not _use_gram_for_steps(problem, iterations)
        if self.factored:
            self.factor = _factor(problem)
            self.offset = _projected_targets(problem) @ self.factor.T
        else:
            self.gram, self.offset = _gram_and_offset(problem)

    def __call__(self, merged: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.factored:
            return torch.addmm(self.offset, merged @ self.factor, self.factor.T, beta=-2.0, alpha=2.0, out=out)
        return torch.addmm(self.offset, merged, self.gram, beta=-2.0, alpha=2.0, out=out)


# --------------------------------------------------------------------------
# The spectral form: every linear update rule in one eigendecomposition.


@dataclass
class InterferenceSpectrum:
    """The objective in the eigenbasis of C, ready for any spectral update.

    With ``C = V diag(ℓ) Vᵀ`` and ``R = τ₀C − D`` (half the gradient at the
    initial point), every iterate of a linear update rule (gradient descent,
    heavy-ball momentum, gradient flow, the closed forms) has the form

        τ = τ₀ + R V diag(γ(ℓ)) Vᵀ

    for one scalar function γ. ``coordinates`` holds RV (m × s) and
    ``directions`` holds V (n × s); when the factor B (n × K) is thinner than C
    the decomposition is done on the K×K matrix BᵀB = W diag(ℓ) Wᵀ instead,
    with ``coordinates = (τ₀B − G)W`` and ``directions = BW`` (columns of norm
    √ℓ, which the algebra absorbs exactly). Directions C does not see (its
    null space) are never represented: updates leave τ₀ unchanged there.
    """

    eigenvalues: torch.Tensor  # ℓ, ascending, length s = min(n, K)
    coordinates: torch.Tensor  # m × s
    directions: torch.Tensor  # n × s
    init: torch.Tensor  # τ₀, m × n

    @property
    def num_columns(self) -> int:
        """n: C has n eigenvalues, of which the ones not stored are zero."""
        return self.init.shape[1]

    def update(self, coefficients: torch.Tensor) -> torch.Tensor:
        """τ₀ + R V diag(γ) Vᵀ for per-eigenvalue coefficients γ."""
        return torch.addmm(self.init, self.coordinates * coefficients, self.directions.T)


def interference_spectrum(problem: InterferenceProblem) -> InterferenceSpectrum:
    """Eigendecompose C (n×n) or BᵀB (K×K), whichever is smaller."""
    n = problem.init.shape[1]
    if n <= problem.total_rank:
        gram, offset = _gram_and_offset(problem)
        eigenvalues, basis = torch.linalg.eigh(gram)
        residual = torch.addmm(offset, problem.init, gram, beta=-1.0)  # τ₀C − D
        del gram, offset
        return InterferenceSpectrum(eigenvalues, residual @ basis, basis, problem.init)
    factor = _factor(problem)
    eigenvalues, basis = torch.linalg.eigh(factor.T @ factor)
    residual = torch.addmm(_projected_targets(problem), problem.init, factor, beta=-1.0)  # τ₀B − G
    return InterferenceSpectrum(eigenvalues, residual @ basis, factor @ basis, problem.init)


def momentum_coefficients(
    eigenvalues: torch.Tensor, *, lr: float, momentum: float, iterations: int
) -> torch.Tensor:
    """γ(ℓ) after ``iterations`` steps of ``torch.optim.SGD`` (heavy ball,
    no dampening, no Nesterov, no weight decay).

    Along an eigen-direction with eigenvalue ℓ the gradient of the update
    Δ = τ − τ₀ is 2(r + ℓΔ), so SGD runs ``b ← μb + 2(r + ℓΔ)``,
    ``Δ ← Δ − lr·b`` from Δ = b = 0 (torch's first buffer is the gradient
    itself, the same thing). Both are linear in r, so Δ_T = γ(ℓ)·r; the
    recurrence for r = 1 is run in float64 on the device.
    """
    ell = eigenvalues.to(torch.float64)
    offset = torch.zeros_like(ell)  # Δ for r = 1
    buffer = torch.zeros_like(ell)
    for _ in range(iterations):
        buffer.mul_(momentum).add_(ell * offset + 1.0, alpha=2.0)
        offset.sub_(buffer, alpha=lr)
    return offset.to(eigenvalues.dtype)


# Cost of a symmetric eigendecomposition of size s, in multiply-adds of an
# s×s×s product (measured: ~24 on CPU with LAPACK syevd; assumed ~150 for
# cuSOLVER, whose eigh is latency-bound next to cuBLAS).
_EIGH_COST = {"cpu": 32, "cuda": 150}


def _spectral_is_cheaper(problem: InterferenceProblem, iterations: int) -> bool:
    m, n = problem.init.shape
    k = problem.total_rank
    size = min(n, k)
    spectral = _EIGH_COST.get(problem.init.device.type, 150) * size**3 + 3 * m * n * size
    per_step = min(m * n * n, 2 * m * n * k)
    return spectral < iterations * per_step


# --------------------------------------------------------------------------
# Optimisers.


def _make_optimizer(
    parameter: torch.Tensor, optimizer: OptimizerName, lr: float, momentum: float
) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return torch.optim.Adam([parameter], lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD([parameter], lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adam' or 'sgd'")


def run_interference_descent(
    problem: InterferenceProblem,
    *,
    optimizer: OptimizerName,
    lr: float,
    iterations: int,
    momentum: float = 0.0,
    solver: Solver = "auto",
) -> torch.Tensor:
    """``iterations`` optimiser steps on the interference objective.

    ``solver``: ``iterative`` runs the torch optimiser on the Gram-form
    gradient; ``spectral`` (SGD only) computes the same iterate from one
    eigendecomposition; ``auto`` takes the spectral form for SGD when it is
    cheaper. Both give the torch optimiser's iterate to float rounding.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adam' or 'sgd'")
    if solver not in ("auto", "iterative", "spectral"):
        raise ValueError(f"unknown solver {solver!r}; expected 'auto', 'iterative' or 'spectral'")
    if solver == "spectral" and optimizer != "sgd":
        raise ValueError("solver 'spectral' needs optimizer 'sgd': Adam's element-wise steps have no spectral form")
    if iterations == 0 or not problem.targets:
        return problem.init.clone()
    if optimizer == "sgd" and (solver == "spectral" or (solver == "auto" and _spectral_is_cheaper(problem, iterations))):
        spectrum = interference_spectrum(problem)
        return spectrum.update(
            momentum_coefficients(spectrum.eigenvalues, lr=lr, momentum=momentum, iterations=iterations)
        )
    gradient = _Gradient(problem, iterations)
    parameter = torch.nn.Parameter(problem.init.clone(), requires_grad=True)
    parameter.grad = torch.empty_like(parameter)
    opt = _make_optimizer(parameter, optimizer, lr, momentum)
    for _ in range(iterations):
        gradient(parameter.detach(), out=parameter.grad)
        opt.step()
    return parameter.detach()


def reference_interference_descent(
    problem: InterferenceProblem,
    *,
    optimizer: OptimizerName,
    lr: float,
    iterations: int,
    momentum: float = 0.0,
) -> torch.Tensor:
    """The straightforward formulation: autograd through the N products
    (τ − Tᵢ)Pᵢᵀ per step (m×m for WUDI; the authors also pad OptMerge's
    projectors to m×n, see ``benchmarks``).

    Kept as the oracle for tests and the baseline for benchmarks; far slower
    for large weights.
    """
    if not problem.targets:
        return problem.init.clone()
    parameter = torch.nn.Parameter(problem.init.clone())
    opt = _make_optimizer(parameter, optimizer, lr, momentum)
    for _ in range(iterations):
        with torch.enable_grad():
            loss = problem.loss(parameter)
            opt.zero_grad()
            loss.backward()
        opt.step()
    return parameter.detach()


def wudi(task_vectors: torch.Tensor, *, iterations: int, lr: float) -> torch.Tensor:
    """WUDI merging: Adam on the interference loss from Σ τᵢ."""
    return run_interference_descent(wudi_problem(task_vectors), optimizer="adam", lr=lr, iterations=iterations)


DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}


def optmerge(
    task_vectors: torch.Tensor,
    *,
    variant: Literal["lora", "full"],
    rank_fraction: float,
    iterations: int,
    lr: Optional[float] = None,
    momentum: float = 0.9,
    solver: Solver = "auto",
) -> torch.Tensor:
    """OptMerge: low-rank denoising, then the interference objective.

    ``lora``: SGD with momentum from the mean (computed in the spectral form
    when cheaper, with the same result); ``full``: Adam from the sum.
    """
    problem = optmerge_problem(task_vectors, variant=variant, rank_fraction=rank_fraction)
    lr = DEFAULT_LR[variant] if lr is None else lr
    if variant == "lora":
        return run_interference_descent(
            problem, optimizer="sgd", lr=lr, iterations=iterations, momentum=momentum, solver=solver
        )
    return run_interference_descent(problem, optimizer="adam", lr=lr, iterations=iterations, solver=solver)
