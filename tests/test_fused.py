"""The fused (torch.compile) chunk kernels give the dense kernels' numbers, and fall back cleanly.

`MERGEKIT_MLLM_COMPILE=1` forces them for tiny tensors (by default only tensors of
≥ 262 144 entries on the CPU use them). The first test of each kernel variant compiles it
(seconds; inductor caches it on disk).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from mergekit_mllm.ops import fused, native, streaming
from test_streaming import NAME, dense, inputs
from test_streaming import test_non_finite_input_is_named as check_non_finite_input_is_named


@pytest.fixture(params=["native", "inductor"])
def compiled(request, monkeypatch):
    """Fused kernels on, a clean 'compile failed' state, and a record of the kernels called. Every
    test runs twice: the TIES pass by the native one-loop kernel (``ties`` recorded for each of its
    calls too) and by the inductor kernel (``MERGEKIT_MLLM_NATIVE=0``)."""
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE", "1")
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "auto" if request.param == "native" else "0")
    monkeypatch.setattr(fused, "_failed", None)
    monkeypatch.setattr(native, "_failed", None)
    calls = []
    original = fused.kernel
    monkeypatch.setattr(fused, "kernel", lambda name: calls.append(name) or original(name))
    original_native = native.kernel

    def native_kernel(*args):
        found = original_native(*args)
        if found is None:
            return None
        return lambda *call_args: calls.append("ties") or found(*call_args)

    monkeypatch.setattr(native, "kernel", native_kernel)
    return calls


@pytest.fixture
def retrimmed(compiled, monkeypatch):
    """Per call of the TIES fix-up's ``retrim`` kernel: (entries redone, entries whose trimmed sum
    now cancels to 0)."""
    records = []
    inner = fused.kernel

    def kernel(name):
        function = inner(name)
        if name != "retrim":
            return function

        def spy(*args):
            result = function(*args)
            records.append((args[3].numel(), int(result[2].sum())))
            return result
        return spy

    monkeypatch.setattr(fused, "kernel", kernel)
    return records


CASES = [
    ("weight_average", {}, torch.bfloat16, 37),
    ("ties_merging", {"density": 0.2}, torch.bfloat16, 1000),
    ("ties_merging", {"density": 1.0}, torch.float32, None),
    ("dare_task_arithmetic", {"drop_rate": 0.3, "seed": 4}, torch.float32, 37),
    ("dare_ties_merging", {"drop_rate": 0.3, "density": 0.2, "seed": 1}, torch.bfloat16, 37),
    ("dare_ties_merging", {"drop_rate": 0.2, "density": 0.3, "seed": 2}, torch.float32, 1000),
]


@pytest.mark.parametrize("method,params,dtype,chunk", CASES)
def test_fused_equals_dense(compiled, method, params, dtype, chunk):
    base, experts = inputs((63, 41), 4, dtype, seed=3)
    weights = [1.0, 0.5, -0.7, 1.3]
    got = streaming.merge(method, base, experts, weights, scale=0.7, dtype=torch.float32, tensor_name=NAME,
                          chunk=chunk, **params)
    assert fused._failed is None
    assert compiled and set(compiled) <= {"sum", "ties", "gather"}
    if "ties" in method:  # one pass: one kernel call per chunk
        assert compiled.count("ties") == -(-base.numel() // (chunk or base.numel()))
    torch.testing.assert_close(got, dense(method, base, experts, weights, 0.7, **params), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ties_merging", "dare_ties_merging"])
def test_fused_massive_ties_at_zero(compiled, method):
    base, experts = inputs((50, 64), 5, torch.bfloat16, seed=5, sparse=True)
    params = {"density": 0.2, "drop_rate": 0.2 if method.startswith("dare") else 0.0}
    got = streaming.merge(method, base, experts, [1.0] * 5, scale=1.0, dtype=torch.float32, tensor_name=NAME,
                          chunk=97, **params)
    assert "ties" in compiled
    torch.testing.assert_close(got, dense(method, base, experts, [1.0] * 5, 1.0, **params), rtol=0, atol=0)


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_fused_zero_sum_entries_take_the_majority_sign(compiled, majority):
    base = torch.zeros(200)
    first = torch.full((200,), majority * 0.5)
    second = torch.zeros(200)
    first[7], second[7] = 0.25, -0.25
    first[150], second[150] = -0.25, 0.25
    got = streaming.merge("ties_merging", base, [first, second], [1.0, 1.0], scale=1.0, dtype=torch.float32,
                          chunk=16, density=1.0)
    assert "ties" in compiled
    assert got[7] == (0.25 if majority > 0 else -0.25) and got[150] == got[7]
    torch.testing.assert_close(got, dense("ties_merging", base, [first, second], [1.0, 1.0], 1.0, density=1.0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 2])
def test_fused_non_finite_input_is_named(compiled, bad):
    check_non_finite_input_is_named(bad, value=float("inf"))
    assert compiled


@pytest.mark.parametrize("method,params", [
    ("ties_merging", {"density": 0.2}),
    ("ties_merging", {"density": 0.7}),
    ("dare_ties_merging", {"drop_rate": 0.3, "density": 0.2, "seed": 1}),
    ("dare_ties_merging", {"drop_rate": 0.5, "density": 0.3, "seed": 3}),
])
def test_fused_ties_fixes_up_the_entries_a_sampled_threshold_trims_wrongly(compiled, retrimmed, monkeypatch, method,
                                                                          params):
    """The one-pass TIES trims with each expert's threshold estimated from a sample; a small sample
    makes the estimate wrong, and the entries it trims differently must be recomputed with the
    exact threshold, the global sign count corrected, and the result equal the dense kernel."""
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 300)
    monkeypatch.setattr(streaming, "BRACKET", 0.08)
    monkeypatch.setattr(streaming, "FIX_BLOCK", 97)  # the fix-up runs in several blocks
    base, experts = inputs((90, 70), 4, torch.bfloat16, seed=11)
    weights = [1.0, 0.5, -0.7, 1.3]
    got = streaming.merge(method, base, experts, weights, scale=0.8, dtype=torch.float32, tensor_name=NAME,
                          chunk=500, **params)
    assert compiled.count("ties") == -(-base.numel() // 500)  # one pass, no repeat
    redone = sum(entries for entries, _ in retrimmed)
    assert len(retrimmed) > 1 and 0 < redone < base.numel() // 4  # some entries, in several blocks
    torch.testing.assert_close(got, dense(method, base, experts, weights, 0.8, **params), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ties_merging", "dare_ties_merging"])
def test_fused_ties_finds_the_exact_threshold_in_each_sub_interval(compiled, retrimmed, monkeypatch, method):
    """The pass counts at ``lower`` ≤ t̂ ≤ ``upper`` inside the sample's bracket and flags each
    entry's sub-interval per expert; the exact threshold can lie in any of the four sub-intervals
    ([low, lower), [lower, t̂), (t̂, upper], (upper, high]), and the fix-up redoes exactly the codes
    between it and t̂ ((1, 2), (2, 2), (3, 3), (3, 4))."""
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 300)
    monkeypatch.setattr(streaming, "BRACKET", 0.1)
    redone_codes = set()
    original = streaming._flag_code_in
    monkeypatch.setattr(streaming, "_flag_code_in", lambda words, index, first, last: redone_codes.add(
        (first, last)) or original(words, index, first, last))
    params = {"density": 0.3, **({"drop_rate": 0.3, "seed": 2} if method.startswith("dare") else {})}
    weights = [1.0, 0.5, -0.7, 1.3]
    for inner in (0.1, 0.9):  # the inner boundaries close to t̂, then close to the bracket's ends
        monkeypatch.setattr(streaming, "INNER", inner)
        for seed in range(3):
            base, experts = inputs((90, 70), 4, torch.float32, seed=20 + seed)
            got = streaming.merge(method, base, experts, weights, scale=0.8, dtype=torch.float32, tensor_name=NAME,
                                  chunk=1000, **params)
            torch.testing.assert_close(got, dense(method, base, experts, weights, 0.8, **params), rtol=0, atol=0)
    assert redone_codes == {(1, 2), (2, 2), (3, 3), (3, 4)}
    assert compiled.count("ties") == 6 * 7  # never a repeated pass


def test_fused_ties_more_experts_than_one_flag_word(compiled, retrimmed, monkeypatch):
    """Twelve experts: the flag codes span two int32 words (ten experts each) and the fix-up reads
    the second word's codes too."""
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 300)
    monkeypatch.setattr(streaming, "BRACKET", 0.08)
    experts_redone = set()
    original = streaming._flag_code_in
    monkeypatch.setattr(streaming, "_flag_code_in", lambda words, index, first, last: experts_redone.add(
        index) or original(words, index, first, last))
    base, experts = inputs((60, 50), 12, torch.float32, seed=5)
    weights = [1.0 - 0.1 * i for i in range(12)]
    got = streaming.merge("ties_merging", base, experts, weights, scale=0.5, dtype=torch.float32, chunk=700,
                          density=0.2)
    torch.testing.assert_close(got, dense("ties_merging", base, experts, weights, 0.5, density=0.2), rtol=0, atol=0)
    assert any(index >= fused.EXPERTS_PER_WORD for index in experts_redone) and retrimmed


@pytest.mark.parametrize("method", ["ties_merging", "dare_ties_merging"])
def test_fused_ties_bracket_miss_repeats_the_pass_with_exact_thresholds(compiled, monkeypatch, method):
    calls = []
    original = streaming._exact_threshold
    monkeypatch.setattr(streaming, "_exact_threshold", lambda *args: calls.append(args[1]) or original(*args))
    monkeypatch.setattr(streaming, "BRACKET", -0.2)  # an empty bracket: the count never lands inside …
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 64)  # … and a sample too small to hit the threshold
    base, experts = inputs((40, 40), 3, torch.float32, seed=6)
    params = {"density": 0.3, **({"drop_rate": 0.4, "seed": 2} if method.startswith("dare") else {})}
    got = streaming.merge(method, base, experts, [1.0, 0.5, 2.0], scale=1.0, dtype=torch.float32,
                          tensor_name=NAME, chunk=101, **params)
    assert calls == [0, 1, 2]
    assert compiled.count("ties") == 2 * 16  # the pass, then once more with the exact thresholds
    torch.testing.assert_close(got, dense(method, base, experts, [1.0, 0.5, 2.0], 1.0, **params), rtol=0, atol=0)


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_fused_ties_fix_up_can_create_zero_sum_entries(retrimmed, monkeypatch, majority):
    """Entries that cancel to 0 only under the exact threshold (the sampled estimate trimmed one
    side away) still take the global majority sign."""
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 64)
    monkeypatch.setattr(streaming, "BRACKET", 0.2)
    monkeypatch.setattr(streaming, "FIX_BLOCK", 50)
    g = torch.Generator().manual_seed(0)
    n = 2000
    base = torch.zeros(n)
    first = majority * (0.01 + torch.rand(n, generator=g))  # sets the majority sign
    second = torch.zeros(n)  # mostly 0, so its threshold is 0: it keeps all …
    second[::10] = -first[::10]  # … and cancels `first` wherever `first` survives its trim
    got = streaming.merge("ties_merging", base, [first, second], [1.0, 1.0], scale=1.0, dtype=torch.float32,
                          chunk=256, density=0.5)
    assert sum(cancelling for _, cancelling in retrimmed) > 0  # recomputed entries that now cancel
    torch.testing.assert_close(got, dense("ties_merging", base, [first, second], [1.0, 1.0], 1.0, density=0.5),
                               rtol=0, atol=0)


def test_fused_ties_threshold_zero_below_a_positive_estimate(compiled, monkeypatch):
    """Just over half the entries are 0 (density 0.5): the exact threshold is 0, but the small
    sample's estimate is positive; every non-zero entry it trimmed must be restored."""
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 64)
    monkeypatch.setattr(streaming, "BRACKET", 0.2)
    estimates = []
    original = streaming._bracket
    monkeypatch.setattr(streaming, "_bracket", lambda *args: (lambda r: estimates.append(r[2].view(-1).tolist()) or r)(
        original(*args)))
    g = torch.Generator().manual_seed(0)
    n = 4000
    experts = []
    for _ in range(2):
        vector = torch.randn(n, generator=g)
        vector[torch.randperm(n, generator=g)[:2050]] = 0
        experts.append(vector)
    base = torch.zeros(n)
    got = streaming.merge("ties_merging", base, experts, [1.0, 1.0], scale=1.0, dtype=torch.float32, chunk=512,
                          density=0.5)
    assert estimates[0][0] > 0  # the case under test: a positive estimate, an exact threshold of 0
    assert compiled.count("ties") == 8  # no repeated pass
    torch.testing.assert_close(got, dense("ties_merging", base, experts, [1.0, 1.0], 1.0, density=0.5),
                               rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ties_merging", "dare_ties_merging"])
def test_fused_ties_on_quantised_task_vectors_needs_no_fix_up(compiled, method):
    """bfloat16 checkpoints: task vectors are multiples of the base's ulp, so |τᵢ| has large tie
    groups and the exact threshold is the sampled estimate's tie group. Those groups are counted,
    not flagged: nothing is recomputed and the pass is not repeated."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(400, 600, generator=g).bfloat16()
    experts = [(base.float() + 1e-3 * torch.randn(400, 600, generator=g)).bfloat16() for _ in range(4)]
    params = {"density": 0.2, **({"drop_rate": 0.3, "seed": 5} if method.startswith("dare") else {})}
    got = streaming.merge(method, base, experts, [1.0] * 4, scale=1.0, dtype=torch.float32, tensor_name=NAME,
                          **params)
    assert compiled.count("ties") == 1 and "retrim" not in compiled
    torch.testing.assert_close(got, dense(method, base, experts, [1.0] * 4, 1.0, **params), rtol=0, atol=0)


def test_compile_failure_falls_back_to_eager_once(monkeypatch, capsys):
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE", "1")
    monkeypatch.setattr(fused, "_failed", None)
    attempts = []

    def broken(name):
        def run(*args):
            attempts.append(name)
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(fused, "kernel", broken)
    base, experts = inputs((30, 30), 3, torch.bfloat16, seed=2)
    for _ in range(2):
        got = streaming.merge("ties_merging", base, experts, [1.0] * 3, scale=0.5, dtype=torch.float32, density=0.3)
        torch.testing.assert_close(got, dense("ties_merging", base, experts, [1.0] * 3, 0.5, density=0.3),
                                   rtol=0, atol=0)
    assert attempts == ["gather"]  # the first kernel (the sample's gather) tried once, then eager throughout
    assert capsys.readouterr().err.count("fused kernels unavailable (RuntimeError: no C++ compiler found)") == 1


def test_when_the_fused_kernels_are_used(monkeypatch):
    monkeypatch.setattr(fused, "_failed", None)
    cpu = torch.device("cpu")
    monkeypatch.delenv("MERGEKIT_MLLM_COMPILE", raising=False)
    assert not fused.wanted(fused.MIN_ELEMENTS - 1, cpu, torch.float32)
    assert fused.wanted(fused.MIN_ELEMENTS, cpu, torch.float32)
    assert not fused.wanted(fused.MIN_ELEMENTS, cpu, torch.float64)  # float64 inputs: eager
    assert not fused.wanted(fused.MIN_ELEMENTS, torch.device("meta"), torch.float32)
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE", "0")
    assert not fused.wanted(1 << 30, cpu, torch.float32)
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE", "1")
    assert fused.wanted(1, cpu, torch.float32)
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="MERGEKIT_MLLM_COMPILE='sometimes'"):
        fused.wanted(1, cpu, torch.float32)


def test_many_kernel_variants_in_one_process_stay_fused(compiled):
    """Every number of experts is a new graph of a kernel; past dynamo's default of 8 variants per
    function, a fullgraph compile fails hard and the whole process used to fall back to eager."""
    base, experts = inputs((16, 12), 10, torch.float32, seed=9)
    for count in range(1, 11):
        got = streaming.merge("weight_average", base, experts[:count], [1.0] * count, scale=1.0,
                              dtype=torch.float32, chunk=64)
        assert fused._failed is None, (count, fused._failed)
        want = dense("weight_average", base, experts[:count], [1.0] * count, 1.0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert compiled.count("sum") == 10 * 3  # every chunk (192 entries in chunks of 64) of every merge


@pytest.mark.parametrize("method", ["dare_task_arithmetic", "dare_ties_merging"])
def test_fused_dare_masks_do_not_depend_on_the_chunking(compiled, method):
    """The fused kernels compute DARE's masks from the entries' positions: every chunking (chunks
    of 37, 64, or the whole tensor) gives the dense result, and the kernels did run."""
    base, experts = inputs((63, 41), 4, torch.bfloat16, seed=3)
    params = {"drop_rate": 0.3, "seed": 1, **({"density": 0.2} if "ties" in method else {})}
    want = dense(method, base, experts, [1.0, 0.5, 2.0, 1.0], 1.0, **params)
    for chunk in (37, 64, base.numel()):
        before = len(compiled)
        got = streaming.merge(method, base, experts, [1.0, 0.5, 2.0, 1.0], scale=1.0, dtype=torch.float32,
                              tensor_name=NAME, chunk=chunk, **params)
        assert len(compiled) > before
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dare_task_arithmetic", "dare_ties_merging"])
def test_dare_counters_split_inside_a_tensor(compiled, monkeypatch, method):
    """Tensors past 2³¹ entries split DARE's counters (hi, lo); with the split moved to 1024 (for
    the dense oracle too) a 6300-entry tensor crosses it six times: chunks stop at the split, the
    kernels fold hi into the key, and the TIES fix-up takes its eager gather; all equal dense."""
    from mergekit_mllm.ops import counter_rng

    monkeypatch.setattr(counter_rng, "SPLIT", 1024)
    monkeypatch.setattr(counter_rng, "_LO_MASK", 1023)
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 300)  # a wrong estimate: the fix-up runs
    monkeypatch.setattr(streaming, "BRACKET", 0.08)
    gathered = []
    original = streaming._Inputs.spans
    monkeypatch.setattr(streaming._Inputs, "spans", lambda self: gathered.extend(original(self)) or original(self))
    base, experts = inputs((90, 70), 4, torch.bfloat16, seed=11)
    params = {"drop_rate": 0.3, "seed": 1, **({"density": 0.2} if "ties" in method else {})}
    got = streaming.merge(method, base, experts, [1.0, 0.5, -0.7, 1.3], scale=0.8, dtype=torch.float32,
                          tensor_name=NAME, chunk=500, **params)
    assert (1000, 1024) in gathered and (1024, 1524) in gathered
    assert "gather" not in compiled  # above the split the fix-up gathers eagerly
    torch.testing.assert_close(got, dense(method, base, experts, [1.0, 0.5, -0.7, 1.3], 0.8, **params),
                               rtol=0, atol=0)


def test_vector_isa_probe_runs_once_per_machine(monkeypatch, tmp_path):
    """inductor's per-process probe of the CPU's vector ISAs (a test library built and dlopen-ed
    in a child Python per ISA) runs once; later processes set inductor's ``cpp.vec_isa_ok``
    switch, which selects the same ISAs. A probe that rejects a reported ISA is not remembered."""
    import platform

    from torch._inductor import config, cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the probe is remembered on x86 only")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    probes = []
    real = cpu_vec_isa.valid_vec_isa_list
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: probes.append(1) or real())
    with config.patch({"cpp.vec_isa_ok": None}):
        assert fused.remember_vector_isa_probe() is False  # probed (once per process: inductor caches it) …
        assert config.cpp.vec_isa_ok is True and len(probes) == 1  # … and the switch set (a cache-key part)
        config.cpp.vec_isa_ok = None  # "a later process"
        assert fused.remember_vector_isa_probe() is True  # the marker is there
        assert config.cpp.vec_isa_ok is True and len(probes) == 1
        # the switch selects what the probe selected
        with_switch = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                       if all(flag in cpu_vec_isa.x86_isa_checker() for flag in str(isa).split()) and isa]
        assert with_switch == [str(isa) for isa in real()]
    with config.patch({"cpp.vec_isa_ok": None}):
        for marker in (tmp_path / "mergekit_mllm").iterdir():
            marker.unlink()
        monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: real()[1:])  # one ISA failed to build
        assert fused.remember_vector_isa_probe() is False
        assert fused.remember_vector_isa_probe() is False and config.cpp.vec_isa_ok is None


# ---------------------------------------------------------------- ahead-of-time packages (the default backend)


@pytest.fixture
def aot(compiled, monkeypatch):
    """The ``aot`` backend (the suite runs ``jit``, see conftest.py) and a record of the packages
    built in this test (packages of earlier runs are reused from the cache). Its tests run the
    inductor TIES pass only (:data:`INDUCTOR_ONLY`): the native pass takes no package."""
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE_BACKEND", "aot")
    builds = []
    original = fused._AotKernel._build

    def build(self, args, path, spec_path):
        builds.append(self.name)
        return original(self, args, path, spec_path)

    monkeypatch.setattr(fused._AotKernel, "_build", build)
    return builds


#: the TIES pass by the inductor kernel only (``compiled``'s other parameter is the native pass)
INDUCTOR_ONLY = pytest.mark.parametrize("compiled", ["inductor"], indirect=True)


@INDUCTOR_ONLY
@pytest.mark.parametrize("method,params,dtype,chunk", [CASES[0], CASES[4]])
def test_aot_packages_equal_dense(compiled, aot, method, params, dtype, chunk):
    test_fused_equals_dense(compiled, method, params, dtype, chunk)
    assert all(isinstance(fused._kernels[f"aot:{name}"], fused._AotKernel) for name in compiled)


@INDUCTOR_ONLY
def test_aot_ties_fix_up_equals_dense(aot, retrimmed, monkeypatch):
    """The whole one-pass TIES with its fix-up (the sample's gather, the pass, the re-trim) through
    the packages: DARE+TIES with a sample small enough that the estimate misses."""
    monkeypatch.setattr(streaming, "SAMPLE_SIZE", 300)
    monkeypatch.setattr(streaming, "BRACKET", 0.08)
    params = {"drop_rate": 0.3, "density": 0.2, "seed": 1}
    base, experts = inputs((90, 70), 4, torch.bfloat16, seed=11)
    weights = [1.0, 0.5, -0.7, 1.3]
    got = streaming.merge("dare_ties_merging", base, experts, weights, scale=0.8, dtype=torch.float32,
                          tensor_name=NAME, chunk=500, **params)
    assert fused._failed is None and retrimmed  # the re-trim ran
    assert {"aot:gather", "aot:ties", "aot:retrim"} <= set(fused._kernels)
    torch.testing.assert_close(got, dense("dare_ties_merging", base, experts, weights, 0.8, **params),
                               rtol=0, atol=0)


@INDUCTOR_ONLY
def test_aot_kernel_reads_strided_arguments_as_their_values(aot):
    """A package indexes its inputs as exported (contiguous); a strided view (a column of a matrix,
    as the bracket's statistics once were) is passed as its values, not read past them."""
    base, experts = inputs((40, 30), 3, torch.bfloat16, seed=4)
    table = torch.tensor([[1.0, 9.0], [0.5, 9.0], [-0.7, 9.0]])
    strided = table[:, 0]
    assert not strided.is_contiguous()

    def arguments(weights):
        return (base.reshape(-1), [e.reshape(-1) for e in experts], weights, None, torch.tensor(0.0),
                torch.tensor(1.0), torch.tensor(0.5), True, torch.bfloat16)

    got = fused.kernel("sum")(*arguments(strided))[0]
    want = fused._sum_kernel(*arguments(strided.contiguous()))[0]  # the source function, eagerly
    assert torch.equal(got, want)


@INDUCTOR_ONLY
def test_aot_package_is_built_once_per_machine(aot, monkeypatch, tmp_path, capsys):
    """A variant's package is built once into the cache (no temporary left behind), reused by a
    later process, and the merging process then never imports dynamo or inductor; a damaged
    package is built again."""
    monkeypatch.setenv("MERGEKIT_MLLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fused, "_kernels", {})
    base, experts = inputs((40, 30), 3, torch.bfloat16, seed=4)
    want = dense("weight_average", base, experts, [1.0] * 3, 0.5)
    got = streaming.merge("weight_average", base, experts, [1.0] * 3, scale=0.5, dtype=torch.float32, chunk=500)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert aot == ["sum"]
    files = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].startswith("sum-") and files[0].endswith(".json") and files[1].endswith(".pt2")
    # another chunk length, the same variant: no new package
    streaming.merge("weight_average", base, experts, [2.0] * 3, scale=0.5, dtype=torch.float32, chunk=333)
    assert aot == ["sum"]
    # a later process loads the package: same numbers, and neither dynamo nor inductor imported
    # (the same thread count: inductor bakes it into the kernel, so it is part of the variant)
    script = f"""
import sys, torch
torch.set_num_threads({torch.get_num_threads()})
from mergekit_mllm.ops import streaming
from test_streaming import inputs
base, experts = inputs((40, 30), 3, torch.bfloat16, seed=4)
got = streaming.merge("weight_average", base, experts, [1.0] * 3, scale=0.5, dtype=torch.float32, chunk=500)
torch.save(got, {str(tmp_path / 'got.pt')!r})
print(sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules))
"""
    env = {**os.environ, "MERGEKIT_MLLM_COMPILE": "1", "MERGEKIT_MLLM_COMPILE_BACKEND": "aot",
           "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "compiling" not in result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "got.pt"), want, rtol=0, atol=0)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == files
    # a damaged package (a full disk, a killed copy) is built again, once, with a note
    package = tmp_path / "cache" / files[1]
    package.write_bytes(package.read_bytes()[:1000])
    monkeypatch.setattr(fused, "_kernels", {})
    got = streaming.merge("weight_average", base, experts, [1.0] * 3, scale=0.5, dtype=torch.float32, chunk=500)
    assert aot == ["sum", "sum"] and fused._failed is None
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "could not be loaded" in capsys.readouterr().err


def test_aot_cache_lives_in_inductors_cache_directory(monkeypatch, tmp_path):
    """Without MERGEKIT_MLLM_KERNEL_CACHE the packages sit in inductor's cache directory (computed
    without importing inductor), so clearing or redirecting inductor's cache covers them too."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("MERGEKIT_MLLM_KERNEL_CACHE", raising=False)
    for inductor in (None, str(tmp_path / "inductor")):
        if inductor is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor)
        assert fused.cache_root() == Path(cache_dir()) / "mergekit_mllm" / "aot"
    monkeypatch.setenv("MERGEKIT_MLLM_KERNEL_CACHE", str(tmp_path / "mine"))
    assert fused.cache_root() == tmp_path / "mine"


def test_compile_backend_is_validated(monkeypatch):
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE_BACKEND", "later")
    with pytest.raises(ValueError, match="MERGEKIT_MLLM_COMPILE_BACKEND='later'"):
        fused.kernel("sum")
    monkeypatch.delenv("MERGEKIT_MLLM_COMPILE_BACKEND")
    assert fused.backend() == "aot"


def test_doctor_reports_how_the_kernels_are_compiled(monkeypatch, tmp_path):
    import shutil as shutil_module

    from mergekit_mllm.cli import _fused_kernels_status

    if shutil_module.which("g++") is None:
        pytest.skip("no g++ on this machine")
    monkeypatch.delenv("MERGEKIT_MLLM_COMPILE", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("MERGEKIT_MLLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE_BACKEND", "aot")
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "auto")
    monkeypatch.setattr(native, "_failed", None)
    native_ties = "; TIES pass: one-loop C++ kernel, built once per machine (MERGEKIT_MLLM_NATIVE=0: inductor's))"
    assert _fused_kernels_status().endswith(f"; ahead-of-time packages in {tmp_path}{native_ties}")
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE_BACKEND", "jit")
    monkeypatch.setenv("MERGEKIT_MLLM_NATIVE", "0")
    assert _fused_kernels_status().endswith("; torch.compile in each process (MERGEKIT_MLLM_COMPILE_BACKEND=jit); "
                                            "TIES pass: inductor's (MERGEKIT_MLLM_NATIVE=0))")
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE_BACKEND", "later")
    assert _fused_kernels_status().startswith("invalid setting: MERGEKIT_MLLM_COMPILE_BACKEND='later'")
    monkeypatch.setenv("MERGEKIT_MLLM_COMPILE_BACKEND", "aot")
    # the compiler the kernels are built with (CXX), not any other one on PATH
    monkeypatch.setenv("CXX", "no-such-c++")
    assert _fused_kernels_status() == ("auto, but the C++ compiler 'no-such-c++' (CXX) was not found: "
                                       "element-wise methods run eagerly")
    monkeypatch.setenv("CXX", "g++")
    assert f"(C++ compiler {shutil_module.which('g++')};" in _fused_kernels_status()
