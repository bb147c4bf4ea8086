"""Every method against an independent formulation, through mergekit's API."""

from __future__ import annotations

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
from mergekit.merge_methods.base import TensorGroup

import oracles
from mergekit_mllm.methods import METHOD_NAMES

ALL = list(METHOD_NAMES)


def make_inputs(shape=(12, 9), experts=3, seed=0, dtype=torch.float64, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=dtype)
    # Correlated experts: a shared direction plus individual noise, like fine-tunes.
    shared = torch.randn(shape, generator=generator, dtype=dtype)
    expert_list = [
        base + scale * (0.5 * shared + torch.randn(shape, generator=generator, dtype=dtype))
        for _ in range(experts)
    ]
    return base, expert_list


def merge(method, base, experts, name="model.layers.0.mlp.up_proj.weight", **parameters):
    return merge_tensors([base] + list(experts), method, base_index=0, name=name, parameters=parameters)


def assert_close(actual, expected, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_every_method_is_registered_with_mergekit():
    registered = {m.spec.name for m in merge_methods.registered_methods()}
    assert set(ALL) <= registered
    assert ALL[:9] == [  # the paper's methods (Task Arithmetic is mergekit's own)
        "weight_average", "ties_merging", "dare_task_arithmetic", "dare_ties_merging",
        "tsv", "iso_c", "iso_cts", "wudi", "optmerge",
    ]
    for name in ALL:
        spec = merge_methods.get(name).spec
        assert spec.contract.base.value == "required"
        assert {"lambda", "weight"} <= {p.name for p in spec.parameters}


def test_registration_is_idempotent():
    from mergekit_mllm import install
    from mergekit_mllm.methods import register_all

    before = merge_methods.registered_methods()
    register_all()
    install()
    assert merge_methods.registered_methods() == before


# ----------------------------------------------------------------- oracles


def test_weight_average_matches_oracle():
    base, experts = make_inputs()
    assert_close(merge("weight_average", base, experts, **{"lambda": 0.7}), oracles.weight_average(base, experts, 0.7))


def test_ties_matches_oracle_and_differs_from_mergekit_ties():
    base, experts = make_inputs(experts=4)
    ours = merge("ties_merging", base, experts, density=0.3, **{"lambda": 1.5})
    assert_close(ours, oracles.ties(base, experts, density=0.3, lam=1.5))
    builtin = merge_tensors(
        [base] + experts, "ties", base_index=0, parameters={"weight": 1.0, "density": 0.3, "lambda": 1.5}
    )
    assert (ours - builtin).abs().max() > 1e-3  # documented: mergekit's ties is another algorithm


def test_ties_zero_sum_entries_take_the_majority_sign():
    base = torch.zeros(2, 2, dtype=torch.float64)
    # Entry (0,0) sums to zero; the other three elect positive signs.
    e1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    e2 = torch.tensor([[-1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    out = merge("ties_merging", base, [e1, e2], density=1.0)
    # Majority sign is +, so only the +1 of e1 survives at (0,0).
    assert_close(out, torch.ones(2, 2, dtype=torch.float64))


def test_ties_keeps_ties_at_threshold():
    base = torch.zeros(1, 5, dtype=torch.float64)
    expert = torch.tensor([[0.5, 0.5, 0.5, 0.1, -0.05]], dtype=torch.float64)
    # density 0.2 → mask ⌊5·0.8⌋=4 smallest; threshold = 4th smallest |τ| = 0.5: all three 0.5s kept.
    out = merge("ties_merging", base, [expert], density=0.2)
    assert_close(out, torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0]], dtype=torch.float64))


def test_tsv_matches_zero_padded_reference():
    base, experts = make_inputs(shape=(16, 10), experts=3)
    assert_close(merge("tsv", base, experts), oracles.tsv(base, experts), rtol=1e-8, atol=1e-10)
    assert_close(
        merge("tsv", base, experts, rank_fraction=0.2, **{"lambda": 0.5}),
        oracles.tsv(base, experts, rank_fraction=0.2, lam=0.5),
        rtol=1e-8, atol=1e-10,
    )


def test_iso_c_matches_oracle():
    base, experts = make_inputs(shape=(8, 14))
    assert_close(merge("iso_c", base, experts, **{"lambda": 0.3}), oracles.iso_c(base, experts, 0.3))


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_reference(fraction):
    base, experts = make_inputs(shape=(15, 11), experts=3)
    assert_close(
        merge("iso_cts", base, experts, common_space_fraction=fraction),
        oracles.iso_cts(base, experts, common_space_fraction=fraction),
        rtol=1e-8, atol=1e-10,
    )


def test_wudi_reproduces_autograd_iterates():
    base, experts = make_inputs(shape=(10, 7), experts=3)
    ours = merge("wudi", base, experts, iterations=40, lr=1e-3)
    reference = oracles.wudi(base, experts, iterations=40, lr=1e-3)
    assert_close(ours, reference, rtol=1e-7, atol=1e-9)
    # the optimisation really moved away from the initial sum
    assert (reference - oracles.task_arithmetic(base, experts)).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(10, 7), (6, 13)])
def test_optmerge_lora_reproduces_autograd_iterates(shape):
    base, experts = make_inputs(shape=shape, experts=3, scale=1.0)
    ours = merge("optmerge", base, experts, variant="lora", iterations=60, lr=1e-2)
    reference = oracles.optmerge(base, experts, variant="lora", iterations=60, lr=1e-2)
    assert_close(ours, reference, rtol=1e-7, atol=1e-9)
    assert (reference - oracles.weight_average(base, experts)).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(10, 7), (6, 13)])
def test_optmerge_full_reproduces_autograd_iterates(shape):
    base, experts = make_inputs(shape=shape, experts=4)
    ours = merge("optmerge", base, experts, variant="full", iterations=30, lr=1e-3, rank_fraction=0.5)
    reference = oracles.optmerge(base, experts, variant="full", iterations=30, lr=1e-3, rank_fraction=0.5)
    assert_close(ours, reference, rtol=1e-7, atol=1e-9)
    assert (reference - oracles.task_arithmetic(base, experts)).abs().max() > 1e-2


def test_float32_optimisation_matches_to_float32_rounding():
    base, experts = make_inputs(shape=(24, 16), experts=5, dtype=torch.float32)
    ours = merge("wudi", base, experts, iterations=30, lr=1e-3)
    reference = oracles.wudi(base, experts, iterations=30, lr=1e-3)
    assert_close(ours, reference, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- DARE


def test_dare_drops_and_rescales():
    base = torch.zeros(200, 50, dtype=torch.float64)
    expert = torch.ones(200, 50, dtype=torch.float64)
    out = merge("dare_task_arithmetic", base, [expert], drop_rate=0.3, seed=7)
    values = sorted(out.unique().tolist())
    assert values == [0.0, pytest.approx(1 / 0.7)]
    assert abs((out == 0).double().mean().item() - 0.3) < 0.02


def test_dare_is_deterministic_per_seed_and_tensor_name():
    base, experts = make_inputs(shape=(30, 20))
    a = merge("dare_task_arithmetic", base, experts, seed=3)
    assert torch.equal(a, merge("dare_task_arithmetic", base, experts, seed=3))
    assert not torch.equal(a, merge("dare_task_arithmetic", base, experts, seed=4))
    assert not torch.equal(a, merge("dare_task_arithmetic", base, experts, seed=3, name="another.weight"))


def test_dare_masks_are_independent_per_expert():
    base = torch.zeros(100, 100, dtype=torch.float64)
    experts = [torch.ones(100, 100, dtype=torch.float64) * (i + 1) for i in range(2)]
    dropped = [
        merge("dare_task_arithmetic", base, [e], drop_rate=0.5).ne(0) for e in experts
    ]
    # One-expert merges reuse expert index 0, so the masks coincide…
    assert torch.equal(dropped[0], dropped[1])
    both = merge("dare_task_arithmetic", base, experts, drop_rate=0.5)
    # …while in a joint merge expert 1 draws its own mask: all four patterns occur.
    assert set(both.unique().tolist()) == {0.0, 2.0, 4.0, 6.0}


def test_dare_with_zero_drop_equals_task_arithmetic_and_ties():
    base, experts = make_inputs()
    assert_close(merge("dare_task_arithmetic", base, experts, drop_rate=0.0), oracles.task_arithmetic(base, experts))
    assert_close(
        merge("dare_ties_merging", base, experts, drop_rate=0.0, density=0.4),
        oracles.ties(base, experts, density=0.4),
    )


def test_dare_ties_is_ties_on_the_dare_vectors():
    base, experts = make_inputs(shape=(20, 20))
    out = merge("dare_ties_merging", base, experts, drop_rate=0.25, density=0.3, seed=1)
    # Recover the DARE vectors expert by expert from one-expert TA merges.
    from mergekit_mllm.ops import dare_drop

    tvs = torch.stack([e - base for e in experts])
    dropped = dare_drop(tvs, drop_rate=0.25, seed=1, tensor_name="model.layers.0.mlp.up_proj.weight")
    assert_close(out, oracles.ties(base, experts, density=0.3, tvs=list(dropped)))


# ----------------------------------------------------------------- parameters


def test_lambda_and_weight_scale_as_documented():
    base, experts = make_inputs()
    for method in ALL:
        kwargs = {"iterations": 5} if method in ("wudi", "optmerge") else {}
        one = merge(method, base, experts, **kwargs) - base
        zero = merge(method, base, experts, **kwargs, **{"lambda": 0.0})
        assert torch.equal(zero, base), method
        half = merge(method, base, experts, **kwargs, **{"lambda": 0.5}) - base
        assert_close(half, 0.5 * one)
    # per-model weight scales τᵢ before merging
    weighted = merge_tensors(
        [base] + experts, "weight_average", base_index=0, parameters={"weight": [2.0, 0.0, 1.0]}
    )
    assert_close(weighted, oracles.weight_average(base, experts, weights=[2.0, 0.0, 1.0]))


@pytest.mark.parametrize(
    "method, parameter, first, second",
    [
        ("ties_merging", "density", 0.2, 0.6),
        ("dare_task_arithmetic", "drop_rate", 0.1, 0.5),
        ("dare_ties_merging", "density", 0.2, 0.6),
        ("tsv", "rank_fraction", 0.2, 0.5),
        ("iso_cts", "common_space_fraction", 0.5, 0.9),
        ("wudi", "lr", 1e-4, 1e-2),
        ("wudi", "iterations", 1, 20),
        ("optmerge", "variant", "lora", "full"),
        ("optmerge", "rank_fraction", 0.2, 0.6),
        ("optmerge", "momentum", 0.0, 0.9),
        ("optmerge", "lr", 1e-3, 1e-2),
    ],
)
def test_every_parameter_has_an_effect(method, parameter, first, second):
    base, experts = make_inputs(shape=(12, 12), scale=1.0)
    extra = {"iterations": 20} if method in ("wudi", "optmerge") and parameter != "iterations" else {}
    a = merge(method, base, experts, **extra, **{parameter: first})
    b = merge(method, base, experts, **extra, **{parameter: second})
    assert (a - b).abs().max() > 1e-6


def test_iterations_zero_returns_the_initial_point():
    base, experts = make_inputs()
    assert_close(merge("wudi", base, experts, iterations=0), oracles.task_arithmetic(base, experts))
    assert_close(merge("optmerge", base, experts, iterations=0), oracles.weight_average(base, experts))
    assert_close(
        merge("optmerge", base, experts, variant="full", iterations=0), oracles.task_arithmetic(base, experts)
    )


def test_non_matrix_and_vocabulary_tensors_use_the_mean():
    base, experts = make_inputs(shape=(12,))
    for method in ("tsv", "iso_c", "iso_cts", "wudi", "optmerge"):
        assert_close(merge(method, base, experts, **{"lambda": 0.4}), oracles.weight_average(base, experts, 0.4))
    base, experts = make_inputs(shape=(12, 8))
    group = TensorGroup.from_tensors([base] + experts, base_index=0, name="lm_head.weight", vocabulary_axis=0)
    (out,) = merge_methods.get("optmerge")((group,))
    assert_close(out, oracles.weight_average(base, experts))


def test_output_keeps_checkpoint_dtype_and_computes_in_float32():
    base, experts = make_inputs(shape=(16, 8), dtype=torch.bfloat16)
    out = merge("optmerge", base, experts, variant="full", iterations=10)
    assert out.dtype == torch.bfloat16
    reference = oracles.optmerge(
        base.float(), [e.float() for e in experts], variant="full", iterations=10
    )
    assert_close(out.float(), reference.to(torch.bfloat16).float(), rtol=0, atol=0.02)


def test_experts_that_left_a_tensor_unchanged_do_not_produce_nan():
    base, experts = make_inputs(shape=(10, 6))
    experts[1] = base.clone()  # a LoRA expert that never touched this weight
    for method in ("wudi", "optmerge"):
        out = merge(method, base, experts, iterations=10)
        assert torch.isfinite(out).all()
    # everyone unchanged → base
    assert torch.equal(merge("optmerge", base, [base.clone(), base.clone()]), base)


def test_merge_state_dicts_applies_methods_per_tensor():
    base, experts = make_inputs(shape=(6, 6))
    state_dicts = {"base": {"w": base, "b": base[0]}}
    for i, expert in enumerate(experts):
        state_dicts[f"e{i}"] = {"w": expert, "b": expert[0]}
    merged = merge_state_dicts(state_dicts, "iso_c", base="base")
    assert set(merged) == {"w", "b"}
    assert_close(merged["w"], oracles.iso_c(base, experts))
    assert_close(merged["b"], oracles.weight_average(base[0], [e[0] for e in experts]))


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "method, parameters, message",
    [
        ("ties_merging", {"density": -0.1}, "density"),
        ("ties_merging", {"density": 1.5}, "density"),
        ("dare_task_arithmetic", {"drop_rate": 1.0}, "drop_rate"),
        ("tsv", {"rank_fraction": 0.0}, "rank_fraction"),
        ("optmerge", {"rank_fraction": 1.5}, "rank_fraction"),
        ("optmerge", {"variant": "lowrank"}, "variant"),
        ("optmerge", {"lr": -1.0}, "lr"),
        ("wudi", {"iterations": -3}, "iterations"),
        ("iso_cts", {"common_space_fraction": 2.0}, "common_space_fraction"),
        ("weight_average", {"lambda": float("nan")}, "lambda"),
    ],
)
def test_bad_parameter_values_are_named(method, parameters, message):
    base, experts = make_inputs()
    with pytest.raises(Exception, match=message):
        merge(method, base, experts, **parameters)


def test_unknown_parameter_is_rejected():
    base, experts = make_inputs()
    with pytest.raises(TypeError, match="Unknown parameter.*densty"):
        merge("ties_merging", base, experts, densty=0.5)


def test_mismatched_shapes_name_the_tensor():
    base, experts = make_inputs(shape=(4, 4))
    experts[0] = torch.zeros(4, 5, dtype=base.dtype)
    with pytest.raises(ValueError, match="mismatch.*model.layers.0.mlp.up_proj.weight"):
        merge("optmerge", base, experts)


def test_nan_inputs_name_the_tensor_and_model():
    base, experts = make_inputs()
    experts[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight of model 3 contains NaN"):
        merge("ties_merging", base, experts)


def test_non_finite_results_are_refused():
    base, experts = make_inputs(dtype=torch.float32)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        merge("weight_average", base, experts, **{"lambda": 1e40})


def test_base_model_is_required():
    base, experts = make_inputs()
    with pytest.raises(ValueError, match="requires a base"):
        merge_tensors([base] + experts, "optmerge")
