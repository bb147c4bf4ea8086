"""The straightforward autograd formulation the authors run (MLLMerging).

Per step, for every expert i: E = (τ − Tᵢ)Pᵢᵀ, loss += wᵢ‖E‖², back-propagated
to τ, then one torch optimiser step. For WUDI Pᵢ = τᵢ (m×n), so E is m×m.
For OptMerge the released code builds Pᵢ = Σ_k V_kᵀ *zero-padded to m×n*
(``S_matrix @ v`` from a ``full_matrices=True`` SVD), so E is m×m as well;
:func:`padded_projectors` rebuilds exactly that. With the unpadded k×n
projectors (``reference_interference_descent``) E is only m×k.

The released loop stacks all N experts into one batched product; here the
experts are back-propagated one at a time (same products, same FLOPs, same
iterate up to summation order) so that the m×m intermediates of an
18944×3584 weight fit in memory for N up to 8 (N × 1.4 GB × 3 otherwise).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergekit_mllm.ops.interference import InterferenceProblem, _make_optimizer


def padded_projectors(problem: InterferenceProblem) -> InterferenceProblem:
    """The same problem with each k×n projector zero-padded to m×n, as released."""
    m = problem.init.shape[0]
    padded = []
    for projector in problem.projectors:
        full = projector.new_zeros((m, projector.shape[1]))
        full[: projector.shape[0]] = projector
        padded.append(full)
    return replace(problem, projectors=padded)


def autograd_descent(
    problem: InterferenceProblem,
    *,
    optimizer: str,
    lr: float,
    iterations: int,
    momentum: float = 0.0,
) -> torch.Tensor:
    """``iterations`` steps of the autograd formulation, expert by expert."""
    parameter = torch.nn.Parameter(problem.init.clone())
    opt = _make_optimizer(parameter, optimizer, lr, momentum)
    weights = problem.weight_vector()
    for _ in range(iterations):
        opt.zero_grad()
        for target, projector, weight in zip(problem.targets, problem.projectors, weights):
            with torch.enable_grad():
                interference = (parameter - target) @ projector.T
                (weight * interference.square().sum()).backward()
            del interference
        opt.step()
    return parameter.detach()
