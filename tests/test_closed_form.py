"""Closed forms of the interference objective against independent formulations.

Oracles, all in float64 and none using the eigendecomposition of C that the
kernels use: least squares through the pseudo-inverse of the factor B
(exact minimiser), a linear solve (ridge), the matrix exponential of an
augmented system (gradient flow = SWUDI without truncation), the SVD of B
(hard truncation), and a line-by-line transcription of the released SWUDI /
ASWUDI solver (C and D by einsum, clamped eigenvalues, τ₀ − τ₀VFVᵀ + DV(F/ℓ)Vᵀ).
"""

from __future__ import annotations

import math

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from mergekit_mllm.ops import closed_form
from mergekit_mllm.ops.closed_form import (
    adaptive_rank,
    aswudi,
    initial_merge,
    interference_minimiser,
    optmerge_exact,
    swudi,
    wudi_exact,
)
from mergekit_mllm.ops.interference import interference_spectrum, optmerge_problem, wudi_problem

DOUBLE = dict(rtol=1e-9, atol=1e-12)


def task_vectors(shape, experts=4, seed=0, dtype=torch.float64, low_rank=None):
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    if low_rank:
        a = torch.randn(experts, m, low_rank, generator=generator, dtype=torch.float64)
        b = torch.randn(experts, low_rank, n, generator=generator, dtype=torch.float64)
        vectors = a @ b / low_rank**0.5
    else:
        shared = torch.randn(m, n, generator=generator, dtype=torch.float64)
        vectors = 0.5 * shared + torch.randn(experts, m, n, generator=generator, dtype=torch.float64)
    return (0.01 * vectors).to(dtype)


def factor_and_targets(problem):
    """B = [√wᵢPᵢᵀ] and G = [√wᵢTᵢPᵢᵀ], straight from the definitions."""
    roots = problem.weight_vector().sqrt()
    factor = torch.cat([p.T * r for p, r in zip(problem.projectors, roots)], dim=1)
    targets = torch.cat([t @ p.T * r for t, p, r in zip(problem.targets, problem.projectors, roots)], dim=1)
    return factor, targets


def least_squares_minimiser(problem):
    """argmin Σ wᵢ‖(τ − Tᵢ)Pᵢᵀ‖² = argmin ‖τB − G‖², nearest τ₀: τ₀(I − BB⁺) + GB⁺."""
    factor, targets = factor_and_targets(problem)
    pinv = torch.linalg.pinv(factor, rtol=1e-10)
    return problem.init - problem.init @ factor @ pinv + targets @ pinv


def gradient_flow(problem, time):
    """τ(t) for dτ/ds = −(τC − D): [τ, I] exp(t [[−C, 0], [D, 0]]), first n columns."""
    factor, targets = factor_and_targets(problem)
    gram, offset = factor @ factor.T, targets @ factor.T
    m, n = problem.init.shape
    system = torch.zeros(n + m, n + m, dtype=gram.dtype)
    system[:n, :n] = -gram
    system[n:, :n] = offset
    start = torch.cat([problem.init, torch.eye(m, dtype=gram.dtype)], dim=1)
    return (start @ torch.linalg.matrix_exp(time * system))[:, :n]


def released_spectral_solver(vectors, response_of, init_mode="sum"):
    """The released SWUDI/ASWUDI solve, transcribed: ``response_of(ℓ_asc)`` → F."""
    count, _, n = vectors.shape
    inverse_norms = 1.0 / vectors.reshape(count, -1).norm(dim=-1).square().clamp(min=1e-12)
    blocks = torch.einsum("nab,nac->nbc", vectors, vectors)
    gram = torch.einsum("n,nbc->bc", inverse_norms, blocks)
    offset = torch.einsum("n,nac->ac", inverse_norms, torch.einsum("nab,nbc->nac", vectors, blocks))
    eigenvalues, basis = torch.linalg.eigh(gram)
    safe = eigenvalues.clamp(min=1e-8)
    response = response_of(safe)
    init = initial_merge(vectors, init_mode)
    return init - (init @ basis * response) @ basis.T + (offset @ basis * (response / safe)) @ basis.T


def top_mask(top):
    """F = 1 on the ``top`` largest of ascending eigenvalues (the released slicing)."""

    def response(eigenvalues):
        mask = torch.zeros_like(eigenvalues)
        mask[eigenvalues.numel() - top:] = 1.0
        return mask

    return response


# ---------------------------------------------------------------- exact minimiser


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (20, 20)])
def test_wudi_exact_is_the_least_squares_minimiser(shape):
    vectors = task_vectors(shape)
    for init_mode in ("sum", "zero"):
        ours = wudi_exact(vectors, init_mode=init_mode)
        problem = wudi_problem(vectors)
        problem.init = initial_merge(vectors, init_mode)
        torch.testing.assert_close(ours, least_squares_minimiser(problem), **DOUBLE)
        # a minimiser: the gradient vanishes
        point = ours.clone().requires_grad_(True)
        problem.loss(point).backward()
        assert point.grad.norm() < 1e-9 * vectors.norm()


@pytest.mark.parametrize("shape", [(40, 16), (16, 40)])
@pytest.mark.parametrize("variant", ["lora", "full"])
def test_optmerge_exact_keeps_the_init_where_the_objective_is_blind(shape, variant):
    # rank-2 experts with k = 2: C has rank ≤ 6 < n, so the null space is large;
    # the eigendecomposition runs on C (n×n) or on BᵀB (K×K) depending on shape.
    vectors = task_vectors(shape, experts=3, low_rank=2)
    fraction = 2 / min(shape)
    ours = optmerge_exact(vectors, variant=variant, rank_fraction=fraction)
    problem = optmerge_problem(vectors, variant=variant, rank_fraction=fraction)
    expected = least_squares_minimiser(problem)
    torch.testing.assert_close(ours, expected, **DOUBLE)
    factor, _ = factor_and_targets(problem)
    null_space = torch.eye(shape[1], dtype=torch.float64) - factor @ torch.linalg.pinv(factor, rtol=1e-10)
    torch.testing.assert_close(ours @ null_space, problem.init @ null_space, **DOUBLE)
    for init_mode in ("sum", "mean", "zero"):
        other = optmerge_exact(vectors, variant=variant, rank_fraction=fraction, init_mode=init_mode)
        torch.testing.assert_close(other @ null_space, initial_merge(vectors, init_mode) @ null_space, **DOUBLE)


def test_ridge_minimises_the_regularised_objective():
    vectors = task_vectors((24, 10), experts=3)
    problem = optmerge_problem(vectors, variant="lora", rank_fraction=1 / 3)
    factor, targets = factor_and_targets(problem)
    gram, offset = factor @ factor.T, targets @ factor.T
    for ridge in (1e-3, 0.1):
        expected = torch.linalg.solve(
            gram + ridge * torch.eye(10, dtype=torch.float64), (offset + ridge * problem.init).T
        ).T
        ours = optmerge_exact(vectors, variant="lora", rank_fraction=1 / 3, ridge=ridge)
        torch.testing.assert_close(ours, expected, **DOUBLE)
    # more ridge, closer to τ₀; none: the interpolating minimiser (loss 0 here, N·k = n)
    exact = optmerge_exact(vectors, variant="lora", rank_fraction=1 / 3)
    assert problem.loss(exact) < 1e-20
    distances = [
        (optmerge_exact(vectors, variant="lora", rank_fraction=1 / 3, ridge=r) - problem.init).norm()
        for r in (0.0, 1e-3, 1e-1, 10.0)
    ]
    assert distances == sorted(distances, reverse=True)


def test_minimiser_in_float32_agrees_with_float64():
    vectors = task_vectors((64, 32), experts=5)
    ours = wudi_exact(vectors.float())
    expected = wudi_exact(vectors)
    assert ((ours.double() - expected).norm() / expected.norm()) < 1e-4


# ---------------------------------------------------------------- SWUDI


@pytest.mark.parametrize("shape", [(30, 12), (10, 40)])
def test_swudi_without_truncation_is_gradient_flow(shape):
    vectors = task_vectors(shape, experts=3)
    for time in (3.0, 30.0):
        ours = swudi(vectors, exp_time=time, truncate_rank_ratio=None)
        problem = wudi_problem(vectors)
        torch.testing.assert_close(ours, gradient_flow(problem, time), rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
@pytest.mark.parametrize("ratio", [0.65, 0.3])
def test_swudi_matches_the_released_solver(shape, ratio):
    vectors = task_vectors(shape)
    top = max(1, int(shape[1] * ratio + 0.999))

    def response(eigenvalues):
        return (1 - torch.exp(-eigenvalues * 300.0)) * top_mask(top)(eigenvalues)

    for init_mode in ("sum", "mean", "zero"):
        expected = released_spectral_solver(vectors, response, init_mode)
        ours = swudi(vectors, exp_time=300.0, truncate_rank_ratio=ratio, init_mode=init_mode)
        torch.testing.assert_close(ours, expected, **DOUBLE)


def test_hard_truncation_projects_on_the_top_singular_directions_of_b():
    vectors = task_vectors((30, 16), experts=3)
    problem = wudi_problem(vectors)
    factor, targets = factor_and_targets(problem)
    left, singular, _ = torch.linalg.svd(factor, full_matrices=False)
    for ratio in (0.25, 0.5, 1.0):
        top = math.ceil(16 * ratio)
        basis, ell = left[:, :top], singular[:top] ** 2
        offset = targets @ factor.T
        expected = problem.init - problem.init @ basis @ basis.T + (offset @ basis / ell) @ basis.T
        ours = swudi(vectors, truncate_rank_ratio=ratio, filter_type="none")
        torch.testing.assert_close(ours, expected, **DOUBLE)
    # truncation at full rank is the exact minimiser
    torch.testing.assert_close(
        swudi(vectors, truncate_rank_ratio=1.0, filter_type="none"), wudi_exact(vectors), **DOUBLE
    )


# ---------------------------------------------------------------- ASWUDI


def padded(values, n):
    return torch.cat([torch.tensor(values, dtype=torch.float64), torch.full((n - len(values),), 1e-8, dtype=torch.float64)])


def test_rank_rules_on_a_known_spectrum():
    ell = padded([4.0, 1.0, 1.0], 3)
    rank = lambda method: int(adaptive_rank(ell, (3, 3), method))  # noqa: E731
    assert rank("participation_sqrt") == 3  # (2+1+1)²/6 = 2.67
    assert rank("participation") == 2  # 36/18
    assert rank("stable_rank") == 2  # 18/16 = 1.125
    assert rank("entropy") == 3  # exp H(2/3, 1/6, 1/6) = 2.38
    assert rank("cumvar_0.9") == 3  # 0.67, 0.83, 1.0
    assert rank("cumvar_0.8") == 2
    assert int(adaptive_rank(ell, (3, 3), "participation", min_rank=3)) == 3
    assert int(adaptive_rank(padded([1.0] * 10, 10), (10, 10), "participation", max_rank_ratio=0.5)) == 5
    with pytest.raises(ValueError, match="auto_rank_method"):
        adaptive_rank(ell, (3, 3), "elbow")
    with pytest.raises(ValueError, match="cumvar"):
        adaptive_rank(ell, (3, 3), "cumvar_x")


def test_gavish_donoho_threshold_as_released():
    # square weight: ω = λ*(1)/√(2+√3) = (4/√3)/1.9319 = 1.1953 times the median √ℓ
    omega = (4 / math.sqrt(3)) / math.sqrt(2 + math.sqrt(3))
    singular = torch.tensor([10.0, 3.0, 1.2, 1.0, 1.0, 0.9, 0.5], dtype=torch.float64)
    assert 1.0 * omega < 1.2  # 1.2 is above the threshold, 1.0 is not
    assert int(adaptive_rank(singular**2, (7, 7), "gavish_donoho")) == 3
    # β = 0.5: ω = λ*(β)/√((1−β)² + β)
    beta = 0.5
    optimal = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))
    omega = optimal / math.sqrt((1 - beta) ** 2 + beta)
    expected = int((singular > omega * singular.median()).sum())
    assert int(adaptive_rank(singular**2, (7, 14), "gavish_donoho")) == expected


@pytest.mark.parametrize("method", ["participation_sqrt", "gavish_donoho", "entropy", "cumvar_0.9"])
def test_aswudi_matches_the_released_solver(method):
    # low-rank experts plus noise: a decaying spectrum, so the rules pick K < n
    vectors = task_vectors((40, 16), experts=3, low_rank=3) + 0.1 * task_vectors((40, 16), experts=3, seed=1)
    spectrum = interference_spectrum(wudi_problem(vectors))
    top = int(adaptive_rank(closed_form.descending_spectrum(spectrum), (40, 16), method))
    assert 1 <= top < 16

    torch.testing.assert_close(
        aswudi(vectors, auto_rank_method=method), released_spectral_solver(vectors, top_mask(top)), **DOUBLE
    )


def test_factor_space_pads_the_spectrum_like_the_released_solver():
    # Wide weight with few experts: K = N·m < n, so only K eigenvalues are
    # stored; the rank rules must still see all n (the rest clamped to 1e-8).
    vectors = task_vectors((4, 30), experts=3)
    spectrum = interference_spectrum(wudi_problem(vectors))
    assert spectrum.eigenvalues.numel() == 12
    full = torch.linalg.eigvalsh(
        sum(v.T @ v / v.square().sum() for v in vectors)
    ).flip(0).clamp(min=1e-8)
    torch.testing.assert_close(closed_form.descending_spectrum(spectrum), full, rtol=1e-9, atol=1e-12)
    for method in ("participation_sqrt", "gavish_donoho"):
        top = int(adaptive_rank(full, (4, 30), method))
        torch.testing.assert_close(
            aswudi(vectors, auto_rank_method=method), released_spectral_solver(vectors, top_mask(top)), **DOUBLE
        )


# ---------------------------------------------------------------- through mergekit


def test_closed_forms_run_through_mergekit_with_lambda_and_validation():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    experts = [base + 0.01 * torch.randn(20, 12, generator=generator, dtype=torch.float64) for _ in range(3)]
    vectors = torch.stack([e - base for e in experts])
    cases = {
        "wudi_exact": ({}, wudi_exact(vectors)),
        "optmerge_exact": ({"ridge": 0.01}, optmerge_exact(vectors, variant="lora", rank_fraction=1 / 3, ridge=0.01)),
        "swudi": ({"truncate_rank_ratio": 0.85}, swudi(vectors, truncate_rank_ratio=0.85)),
        "aswudi": ({"auto_rank_method": "gavish_donoho"}, aswudi(vectors, auto_rank_method="gavish_donoho")),
    }
    for method, (parameters, merged_vector) in cases.items():
        out = merge_tensors([base] + experts, method, base_index=0, name="w", parameters={**parameters, "lambda": 0.2})
        torch.testing.assert_close(out, base + 0.2 * merged_vector, **DOUBLE)
    for method, parameters in [
        ("swudi", {"init_mode": "median"}),
        ("swudi", {"filter_type": "gaussian"}),
        ("aswudi", {"auto_rank_method": "elbow"}),
        ("wudi_exact", {"ridge": -1.0}),
        ("optmerge_exact", {"variant": "half"}),
    ]:
        with pytest.raises(Exception, match=next(iter(parameters))):
            merge_tensors([base] + experts, method, base_index=0, name="w", parameters=parameters)


def test_closed_forms_never_read_tensor_values_on_the_host():
    vectors = torch.empty(4, 40, 24, device="meta")
    outputs = [
        wudi_exact(vectors),
        optmerge_exact(vectors, variant="lora", rank_fraction=0.25),
        swudi(vectors),
        aswudi(vectors),
        aswudi(vectors, auto_rank_method="gavish_donoho"),
        interference_minimiser(wudi_problem(vectors), ridge=0.1),
    ]
    assert all(out.device.type == "meta" and out.shape == (40, 24) for out in outputs)
