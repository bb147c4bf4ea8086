"""The native one-loop TIES pass (mergekit_mllm/ops/native_ties.cpp): built once per variant and
machine, split across threads without changing a bit, and replaced by the inductor kernel where it
does not apply or cannot be built. Its numbers are tested against the dense kernels by every fused
TIES test in test_fused.py (run with both passes)."""

import pytest
import torch

from mergekit_mllm.ops import counter_rng, fused, native, streaming
from test_streaming import NAME, dense, inputs


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Native on, nothing loaded or failed yet, libraries cached in a temporary directory; a record
    of the variants built."""
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE", "1")
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "auto")
    monkeypatch.setenv("MERGEKIT_MLLM_KERNEL_CACHE", str(tmp_path / "aot"))
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(fused, "_failed", None)
    builds = []
    original = native._build
    monkeypatch.setattr(native, "_build", lambda *args: builds.append(args[:3]) or original(*args))
    return builds


def _pass_inputs(count, length, dare, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(length, generator=generator).bfloat16()
    experts = [(base.float() + 0.01 * torch.randn(length, generator=generator)).bfloat16() for _ in range(count)]
    weights = torch.linspace(0.5, 1.5, count)
    keys = None
    if dare:
        k1, k2, lo = counter_rng.span_keys([counter_rng.expert_key(1, NAME, i) for i in range(count)], 777)
        keys = (torch.tensor(lo, dtype=torch.int32), torch.tensor(k1, dtype=torch.int32),
                torch.tensor(k2, dtype=torch.int32))
    estimate = torch.full((count,), 0.008)
    bracket = [estimate, estimate * 0.9, estimate * 1.1, torch.full((count,), -2.0), estimate * 0.97, estimate * 1.03]
    return base, experts, weights, keys, bracket


def _run(ties_pass, base, experts, weights, keys, bracket, words):
    length = base.numel()
    out = torch.empty_like(base)
    counts = torch.zeros(4 * len(experts), dtype=torch.int64)
    flagged = torch.full((length,), -1, dtype=torch.int64)
    word_buffers = [torch.zeros(length, dtype=torch.int32) for _ in range(words)]
    found, signs, finite_inputs, finite_result = ties_pass(
        base, experts, weights, keys, counter_rng.keep_threshold(0.3), float(torch.tensor(0.7)), bracket, 0.9, out,
        counts, 5000, flagged, word_buffers)
    return out, counts, signs, flagged[:found], [w[:found] for w in word_buffers], finite_inputs, finite_result


@pytest.mark.parametrize("count,dare", [(5, True), (12, False)])
def test_threads_split_a_chunk_without_changing_a_bit(fresh, monkeypatch, count, dare):
    """With torch's intra-op threads a chunk runs as spans on a thread pool; the spans' flagged
    entries are moved together: every output equals the one-thread run, which equals the
    inductor kernel plus ``nonzero`` (the flag words, counts and result)."""
    base, experts, weights, keys, bracket = _pass_inputs(count, 10_007, dare)
    ties_pass = native.kernel(count, dare, torch.bfloat16, [e.dtype for e in experts])
    assert ties_pass is not None
    words = -(-count // fused.EXPERTS_PER_WORD)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run(ties_pass, base, experts, weights, keys, bracket, words)
        monkeypatch.setattr(native, "MIN_SPAN", 1000)
        torch.set_num_threads(3)
        split = _run(ties_pass, base, experts, weights, keys, bracket, words)
    finally:
        torch.set_num_threads(threads)
    out, counts, signs, flagged, flag_words, finite_inputs, finite_result = single
    assert finite_inputs and finite_result and 0 < flagged.numel() < base.numel()
    assert torch.equal(out.view(torch.int16), split[0].view(torch.int16))
    assert torch.equal(counts, split[1]) and signs == split[2]
    assert torch.equal(flagged, split[3]) and all(torch.equal(a, b) for a, b in zip(flag_words, split[4]))

    # the inductor kernel on the same chunk
    drop = torch.tensor(counter_rng.keep_threshold(0.3), dtype=torch.int32)
    result, signs_ref, words_ref, counts_ref, _, _ = fused.kernel("ties")(
        base, experts, weights, keys, drop, torch.tensor(0.7), *bracket, torch.tensor(0.9), torch.bfloat16)
    assert torch.equal(out.view(torch.int16), result.view(torch.int16))
    assert torch.equal(counts, counts_ref.to(torch.int64)) and signs == int(signs_ref)
    any_flag = torch.stack(list(words_ref)).ne(0).any(dim=0)
    assert torch.equal(flagged, any_flag.nonzero().squeeze(1) + 5000)
    assert all(torch.equal(mine, theirs[any_flag]) for mine, theirs in zip(flag_words, words_ref))


def test_a_variant_is_built_once_per_machine(fresh, monkeypatch):
    assert native.kernel(3, True, torch.bfloat16, [torch.bfloat16] * 3) is not None
    assert native.kernel(3, True, torch.bfloat16, [torch.bfloat16] * 3) is not None  # loaded in this process
    monkeypatch.setattr(native, "_libraries", {})  # a new process: the cached library is loaded
    assert native.kernel(3, True, torch.bfloat16, [torch.bfloat16] * 3) is not None
    assert native.kernel(3, False, torch.float32, [torch.float32] * 3) is not None
    assert fresh == [(3, True, torch.bfloat16), (3, False, torch.float32)]
    assert native.library_path(3, True, torch.bfloat16).exists()


def test_it_applies_to_bf16_or_float32_inputs_of_one_dtype(fresh, monkeypatch):
    assert native.kernel(2, False, torch.float16, [torch.float16] * 2) is None
    assert native.kernel(2, False, torch.bfloat16, [torch.bfloat16, torch.float32]) is None
    assert native.kernel(native.MAX_EXPERTS + 1, False, torch.bfloat16, [torch.bfloat16] * 65) is None
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "0")
    assert native.kernel(2, False, torch.bfloat16, [torch.bfloat16] * 2) is None
    assert fresh == []
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "1")  # required, but only where it applies
    assert native.kernel(2, False, torch.float16, [torch.float16] * 2) is None
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "maybe")
    with pytest.raises(ValueError, match="MERGEKIT_MLLM_NATIVE='maybe'"):
        native.kernel(2, False, torch.bfloat16, [torch.bfloat16] * 2)


def test_a_failed_build_falls_back_to_the_inductor_kernel_once(fresh, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    base, experts = inputs((90, 70), 3, torch.bfloat16, seed=2)
    weights = [1.0, 0.5, -0.7]
    params = {"drop_rate": 0.3, "density": 0.2, "seed": 1}
    for _ in range(2):
        got = streaming.merge("dare_ties_merging", base, experts, weights, scale=0.8, dtype=torch.float32,
                              tensor_name=NAME, chunk=1000, **params)
        torch.testing.assert_close(got, dense("dare_ties_merging", base, experts, weights, 0.8, **params),
                                   rtol=0, atol=0)
    assert capsys.readouterr().err.count("the native TIES kernel is unavailable (FileNotFoundError") == 1
    assert native._failed is not None and fused._failed is None  # the inductor kernels still run
    assert not list((native.library_path(3, True, torch.bfloat16).parent).glob("*"))  # nothing half-written


def test_a_failed_build_is_an_error_where_the_native_kernel_is_required(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "1")
    base, experts = inputs((90, 70), 3, torch.bfloat16, seed=2)
    with pytest.raises(RuntimeError, match="MERGEKIT_MLLM_NATIVE=1, but the native TIES kernel could not be built"):
        streaming.merge("ties_merging", base, experts, [1.0] * 3, scale=1.0, dtype=torch.float32, tensor_name=NAME)


def test_the_pass_refuses_arguments_it_would_read_or_write_out_of_bounds(fresh):
    base, experts, weights, keys, bracket = _pass_inputs(3, 4096, True)
    ties_pass = native.kernel(3, True, torch.bfloat16, [e.dtype for e in experts])
    out, counts = torch.empty_like(base), torch.zeros(12, dtype=torch.int64)
    flagged, words = torch.empty(4096, dtype=torch.int64), [torch.empty(4096, dtype=torch.int32)]
    arguments = (keys, 7, 0.7, bracket, 1.0)
    with pytest.raises(ValueError, match="wrong lengths"):  # room for fewer flagged entries than entries
        ties_pass(base, experts, weights, *arguments, out, counts, 0, flagged[:4000], words)
    with pytest.raises(ValueError, match="wrong lengths"):  # an expert shorter than the base
        ties_pass(base, [experts[0][:100], *experts[1:]], weights, *arguments, out, counts, 0, flagged, words)
    with pytest.raises(TypeError, match="got a torch.float32 tensor"):
        ties_pass(base.float(), experts, weights, *arguments, out, counts, 0, flagged, words)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.empty(2 * 4096, dtype=torch.bfloat16)[::2]  # 4096 entries, every other one
        ties_pass(base, experts, weights, *arguments, strided, counts, 0, flagged, words)
    assert ties_pass(base, experts, weights, *arguments, out, counts, 0, flagged, words)[0] > 0
