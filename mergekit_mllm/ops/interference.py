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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional

import torch

from mergekit_mllm.ops.spectral import rank_per_task, truncated_svd

OptimizerName = Literal["adam", "sgd"]


@dataclass
class InterferenceProblem:
    """``min Σᵢ wᵢ ‖(τ − Tᵢ)Pᵢᵀ‖²`` for one weight, started at ``init``."""

    targets: List[torch.Tensor]  # Tᵢ, each m × n
    projectors: List[torch.Tensor]  # Pᵢ, each kᵢ × n
    weights: List[float]  # wᵢ
    init: torch.Tensor  # m × n

    def loss(self, merged: torch.Tensor) -> torch.Tensor:
        """The objective, evaluated straightforwardly (for tests and logs)."""
        total = merged.new_zeros(())
        for target, projector, weight in zip(self.targets, self.projectors, self.weights):
            total = total + weight * ((merged - target) @ projector.T).square().sum()
        return total


def _squared_norms(task_vectors: torch.Tensor) -> List[float]:
    return [float(tv.square().sum()) for tv in task_vectors]


def _drop_null_experts(task_vectors: torch.Tensor) -> tuple[torch.Tensor, List[float]]:
    """Keep experts with a non-zero task vector for this weight.

    An expert that left a weight unchanged (common with LoRA experts) has the
    term 0/0 in the authors' loss, which turns the whole merge into NaN; its
    true contribution is zero, so it is left out of the objective.
    """
    norms = _squared_norms(task_vectors)
    keep = [i for i, norm in enumerate(norms) if norm > 0.0]
    return task_vectors[keep], [norms[i] for i in keep]


def wudi_problem(task_vectors: torch.Tensor) -> InterferenceProblem:
    """WUDI: targets and projectors are the task vectors themselves."""
    active, norms = _drop_null_experts(task_vectors)
    return InterferenceProblem(
        targets=list(active),
        projectors=list(active),
        weights=[1.0 / norm for norm in norms],
        init=task_vectors.sum(dim=0),
    )


def optmerge_problem(
    task_vectors: torch.Tensor, *, variant: Literal["lora", "full"], rank_fraction: float
) -> InterferenceProblem:
    """OptMerge: low-rank denoised targets and input-subspace projectors."""
    mean = task_vectors.mean(dim=0)
    k = rank_per_task(task_vectors.shape[1:], rank_fraction)
    active, norms = _drop_null_experts(task_vectors)
    targets, projectors = [], []
    for task_vector in active:
        u, s, vh = truncated_svd(task_vector, k)
        projectors.append(s[:, None] * vh)  # Σ_k V_kᵀ of the uncentred τᵢ
        if variant == "lora":
            targets.append((u * s) @ vh)
        else:
            u_c, s_c, vh_c = truncated_svd(task_vector - mean, k)
            targets.append((u_c * s_c) @ vh_c + mean)
    init = mean if variant == "lora" else task_vectors.sum(dim=0)
    return InterferenceProblem(
        targets=targets, projectors=projectors, weights=[1.0 / n for n in norms], init=init
    )


class _Gradient:
    """``∇L(τ) = 2(τC − D)`` from precomputed C (or its factor B) and D."""

    def __init__(self, problem: InterferenceProblem):
        n = problem.init.shape[1]
        factor = torch.cat(
            [projector.T * weight**0.5 for projector, weight in zip(problem.projectors, problem.weights)],
            dim=1,
        )  # n × K, C = B Bᵀ
        # τC costs m·n² with C formed, 2·m·n·K through the factor.
        self.factored = 2 * factor.shape[1] < n
        self.factor = factor
        self.gram = None if self.factored else factor @ factor.T
        offset = torch.zeros_like(problem.init)
        for target, projector, weight in zip(problem.targets, problem.projectors, problem.weights):
            offset.addmm_((target @ projector.T) * weight, projector)
        self.offset = offset  # D

    def __call__(self, merged: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.factored:
            return torch.addmm(self.offset, merged @ self.factor, self.factor.T, beta=-2.0, alpha=2.0, out=out)
        return torch.addmm(self.offset, merged, self.gram, beta=-2.0, alpha=2.0, out=out)


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
) -> torch.Tensor:
    """Run ``iterations`` optimiser steps with the Gram-form gradient."""
    if not problem.targets:
        return problem.init.clone()
    gradient = _Gradient(problem)
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
    """The authors' formulation: autograd through the N m×m products per step.

    Kept as the baseline for benchmarks; far slower for large weights.
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
) -> torch.Tensor:
    """OptMerge: low-rank denoising, then the interference objective.

    ``lora``: SGD with momentum from the mean; ``full``: Adam from the sum.
    """
    problem = optmerge_problem(task_vectors, variant=variant, rank_fraction=rank_fraction)
    lr = DEFAULT_LR[variant] if lr is None else lr
    if variant == "lora":
        return run_interference_descent(problem, optimizer="sgd", lr=lr, iterations=iterations, momentum=momentum)
    return run_interference_descent(problem, optimizer="adam", lr=lr, iterations=iterations)
