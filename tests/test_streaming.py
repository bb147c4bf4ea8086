"""The chunked element-wise kernels equal the dense ones, whatever the chunking.

`mergekit_mllm.ops.streaming` is what mergekit runs for weight_average, TIES and DARE;
the dense kernels in `mergekit_mllm.ops.elementwise` are checked against independent
oracles in test_methods.py. Here chunk sizes are tiny so every code path (several chunks,
threshold bracket hits and misses, ties at the threshold, the majority-sign fix-up) runs.
"""

import unittest.mock

import pytest
import torch

from mergekit.merge_methods.api import merge_tensors

from mergekit_mllm import ops
from mergekit_mllm.ops import streaming

NAME = "model.layers.0.mlp.up_proj.weight"


def dense(method, base, experts, weights, scale, density=0.2, drop_rate=0.0, seed=0):
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    tvs = torch.stack([(e.to(dtype) - base.to(dtype)) * w for e, w in zip(experts, weights)])
    if method == "weight_average":
        merged = ops.weight_average(tvs)
    elif method == "ties_merging":
        merged = ops.ties_merging(tvs, density=density)
    elif method == "dare_task_arithmetic":
        merged = ops.dare_task_arithmetic(tvs, drop_rate=drop_rate, seed=seed, tensor_name=NAME)
    else:
        merged = ops.dare_ties_merging(tvs, drop_rate=drop_rate, density=density, seed=seed, tensor_name=NAME)
    return (base.to(dtype) + scale * merged).to(base.dtype)


def inputs(shape, n, dtype, seed=0, sparse=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    experts = []
    for _ in range(n):
        delta = 0.05 * torch.randn(shape, generator=g)
        if sparse:  # bf16-style: most entries unchanged, so |τ| has massive ties at 0
            delta = delta * (torch.rand(shape, generator=g) < 0.1)
        experts.append((base.float() + delta).to(dtype))
    return base, experts


CASES = [
    ("weight_average", {}),
    ("ties_merging", {"density": 0.2}),
    ("ties_merging", {"density": 0.9}),
    ("ties_merging", {"density": 1.0}),
    ("dare_task_arithmetic", {"drop_rate": 0.3, "seed": 4}),
    ("dare_ties_merging", {"drop_rate": 0.3, "density": 0.2, "seed": 1}),
]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [37, 1000, None])
def test_streaming_equals_dense(method, params, dtype, chunk):
    base, experts = inputs((63, 41), 4, dtype, seed=3)
    weights = [1.0, 0.5, -0.7, 1.3]
    got = streaming.merge(method, base, experts, weights, scale=0.7, dtype=torch.float32, tensor_name=NAME,
                          chunk=chunk, **params)
    want = dense(method, base, experts, weights, 0.7, **params)
    assert got.dtype == dtype and got.shape == base.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ties_merging", "dare_ties_merging"])
def test_massive_ties_at_zero(method):
    """bf16 experts leave most entries unchanged: the 80th percentile of |τ| is an exact 0."""
    base, experts = inputs((50, 64), 5, torch.bfloat16, seed=5, sparse=True)
    params = {"density": 0.2, "drop_rate": 0.2 if method.startswith("dare") else 0.0}
    got = streaming.merge(method, base, experts, [1.0] * 5, scale=1.0, dtype=torch.float32, tensor_name=NAME,
                          chunk=97, **params)
    torch.testing.assert_close(got, dense(method, base, experts, [1.0] * 5, 1.0, **params), rtol=0, atol=0)


def test_bracket_miss_falls_back_to_exact_selection(monkeypatch):
    calls = []
    original = streaming._exact_threshold

    def spy(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(streaming, "BRACKET", -0.2)  # an empty bracket: the count never lands inside
    monkeypatch.setattr(streaming, "_exact_threshold", spy)
    base, experts = inputs((40, 40), 3, torch.float32, seed=6)
    got = streaming.merge("ties_merging", base, experts, [1.0] * 3, scale=1.0, dtype=torch.float32, chunk=101,
                          density=0.3)
    assert calls == [0, 1, 2]
    torch.testing.assert_close(got, dense("ties_merging", base, experts, [1.0] * 3, 1.0, density=0.3),
                               rtol=0, atol=0)


def test_dare_ties_over_many_passes_matches_dense(monkeypatch):
    """DARE+TIES read in up to N + 2 passes (forced by an empty threshold bracket) applies the same
    masks in every pass: they are a function of the entries' positions, not of the draw order."""
    monkeypatch.setattr(streaming, "BRACKET", -0.2)
    base, experts = inputs((40, 40), 3, torch.bfloat16, seed=8)
    params = {"drop_rate": 0.4, "density": 0.3, "seed": 2}
    got = streaming.merge("dare_ties_merging", base, experts, [1.0, 0.5, 2.0], scale=0.9, dtype=torch.float32,
                          tensor_name=NAME, chunk=101, **params)
    torch.testing.assert_close(got, dense("dare_ties_merging", base, experts, [1.0, 0.5, 2.0], 0.9, **params),
                               rtol=0, atol=0)


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_zero_sum_entries_take_the_majority_sign(majority):
    """Entries where trimmed values cancel exactly: the dense kernel gives them the global
    majority sign, decided only after every chunk has been seen."""
    base = torch.zeros(200)
    first = torch.full((200,), majority * 0.5)  # sets the majority sign everywhere …
    second = torch.zeros(200)
    first[7], second[7] = 0.25, -0.25  # … except entries that cancel exactly, in the first chunk
    first[150], second[150] = -0.25, 0.25
    experts = [first, second]
    got = streaming.merge("ties_merging", base, experts, [1.0, 1.0], scale=1.0, dtype=torch.float32, chunk=16,
                          density=1.0)
    want = dense("ties_merging", base, experts, [1.0, 1.0], 1.0, density=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[7] == (0.25 if majority > 0 else -0.25)


@pytest.mark.parametrize("method,params", [CASES[1], CASES[5]])
def test_small_tensors_run_ties_densely(method, params, monkeypatch):
    """TIES on a tensor of at most DENSE_MAX entries runs through the dense kernels in one piece
    (the streaming passes' fixed costs dominate there): the same numbers as the streaming passes,
    and non-finite inputs and results are still refused by name."""
    dense_calls = []
    original = streaming._merge_dense
    monkeypatch.setattr(streaming, "_merge_dense", lambda *a, **k: dense_calls.append(a[0]) or original(*a, **k))
    base, experts = inputs((63, 41), 4, torch.bfloat16, seed=3)
    weights = [1.0, 0.5, -0.7, 1.3]
    run = dict(scale=0.7, dtype=torch.float32, tensor_name=NAME, **params)
    got = streaming.merge(method, base, experts, weights, **run)
    assert dense_calls == [method]
    streamed = streaming.merge(method, base, experts, weights, chunk=500, **run)
    assert dense_calls == [method]  # an explicit chunk streams
    assert got.dtype == base.dtype and got.shape == base.shape
    torch.testing.assert_close(got, streamed, rtol=0, atol=0)
    monkeypatch.setattr(streaming, "DENSE_MAX", base.numel() - 1)
    torch.testing.assert_close(streaming.merge(method, base, experts, weights, **run), got, rtol=0, atol=0)
    assert dense_calls == [method]  # above the limit: streamed
    monkeypatch.setattr(streaming, "DENSE_MAX", base.numel())
    for bad in (-1, 2):
        tensors = [base.clone()] + [e.clone() for e in experts]
        tensors[bad + 1][5, 7] = float("inf")
        with pytest.raises(streaming.NonFiniteInput) as error:
            streaming.merge(method, tensors[0], tensors[1:], weights, **run)
        assert error.value.index == bad
    with pytest.raises(FloatingPointError):
        streaming.merge(method, base.float(), [e.float() for e in experts], weights, **{**run, "scale": 1e39})


def test_dare_masks_do_not_depend_on_chunking():
    base, experts = inputs((30, 30), 2, torch.float32, seed=7)
    outs = [streaming.merge("dare_task_arithmetic", base, experts, [1.0, 1.0], scale=1.0, dtype=torch.float32,
                            tensor_name=NAME, drop_rate=0.5, seed=3, chunk=c) for c in (7, 64, None)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("bad", [0, 2])
def test_non_finite_input_is_named(bad, value=float("nan")):
    base, experts = inputs((20, 20), 2, torch.float32, seed=8)
    tensors = [base] + experts
    tensors[bad] = tensors[bad].clone()
    tensors[bad][13, 3] = value
    with pytest.raises(ValueError, match="base model" if bad == 0 else "of model 2 "):
        merge_tensors(tensors, "ties_merging", base_index=0, name=NAME)


def test_mergekit_runs_the_streaming_kernel(monkeypatch):
    seen = []
    original = streaming.merge
    monkeypatch.setattr(streaming, "merge", lambda *a, **k: seen.append(a[0]) or original(*a, **k))
    base, experts = inputs((16, 8), 2, torch.bfloat16, seed=9)
    out = merge_tensors([base] + experts, "dare_ties_merging", base_index=0, name=NAME,
                        parameters={"drop_rate": 0.1, "density": 0.5, "lambda": 0.5})
    assert seen == ["dare_ties_merging"]
    torch.testing.assert_close(out, dense("dare_ties_merging", base, experts, [1.0, 1.0], 0.5, density=0.5,
                                          drop_rate=0.1), rtol=0, atol=0)


@pytest.mark.parametrize("share", [0.78, 0.797, 0.8, 0.803, 0.82])
def test_quantised_task_vectors(share):
    """Checkpoint task vectors are multiples of the base's ulp: the threshold sits on a level
    holding many entries, often at one end of the sampled bracket."""
    n = 20000
    g = torch.Generator().manual_seed(int(share * 1000))
    base = torch.zeros(n)
    experts = []
    for _ in range(3):
        levels = torch.where(torch.rand(n, generator=g) < share, 0.01, 0.02)
        experts.append(levels * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0))
    got = streaming.merge("ties_merging", base, experts, [1.0] * 3, scale=1.0, dtype=torch.float32, chunk=999,
                          density=0.2)
    torch.testing.assert_close(got, dense("ties_merging", base, experts, [1.0] * 3, 1.0, density=0.2), rtol=0, atol=0)


def test_growable_buffer_keeps_order_across_growth():
    buffer = streaming._Growable(3, torch.float32, "cpu")
    pieces = [torch.arange(k, dtype=torch.float32) + 10 * k for k in (2, 0, 5, 1, 9)]
    for piece in pieces:
        buffer.extend(piece)
    assert torch.equal(buffer.values(), torch.cat(pieces))


@pytest.mark.parametrize("case", ["continuous", "ties", "zeros", "tie group inside", "float64"])
def test_order_statistics_equal_a_full_sort(case):
    """The bracket's order statistics (a radix histogram, then a sort of the bins between the first
    and the last rank, or a selection within a bin when a tie group makes that window large) equal
    the entries of the fully sorted sample, row by row (rows of different kinds in one call)."""
    g = torch.Generator().manual_seed(7)
    samples = torch.randn(4, 20000, generator=g).abs()
    ranks = [15700, 15800, 16000, 16200, 16300]  # the bracket's: a narrow window near the 80 % quantile
    samples[1, :6000] = samples[1].sort().values[15900]  # a tie group larger than the window's limit
    if case == "ties":
        samples[0] = (samples[0] * 64).round() / 64
    if case == "zeros":  # row 0's ranks lie above a group of zeros, row 2's partly in it (a large window)
        samples[0, :15000] = 0
        samples[2, :16100] = 0
    if case == "tie group inside":  # a tie group at one rank inside the window, below the limit
        samples[0, :3000] = samples[0].sort().values[16000]
    if case == "float64":
        samples = samples.double()
    selections = []
    kthvalue = torch.Tensor.kthvalue
    with unittest.mock.patch.object(torch.Tensor, "kthvalue", lambda self, k: selections.append(k) or kthvalue(self, k)):
        got = streaming._order_statistics(samples, ranks)
    assert got.shape == (4, len(ranks)) and got.dtype == samples.dtype
    assert torch.equal(got, samples.sort(dim=1).values[:, ranks])
    # a selection per rank only in rows with a large window (row 1, and row 2 with zeros); float64 selects all
    assert len(selections) == {"float64": 4, "zeros": 2}.get(case, 1) * len(ranks)
    # ranks spread over the whole sample: every row's window is large
    wide = [0, 1, 9999, 19998, 19999]
    assert torch.equal(streaming._order_statistics(samples, wide), samples.sort(dim=1).values[:, wide])
