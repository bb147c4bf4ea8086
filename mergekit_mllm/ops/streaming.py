"""Element-wise methods computed in cache-sized chunks, straight from the inputs.

The dense kernels in :mod:`mergekit_mllm.ops.elementwise` take stacked float32
task vectors: N + 2 float32 copies of the weight, several more temporaries
(masks, trimmed vectors) and a full ``kthvalue`` per expert. For a bfloat16
checkpoint that is 4–10× the memory traffic of mergekit's ``task_arithmetic``.
Here the same numbers are produced chunk by chunk (a few MiB of float32 per
chunk, reused), reading each bfloat16 input once per pass and writing the
output once:

* Weight Average, DARE+TA: one pass.
* TIES, DARE+TIES need each expert's trim threshold (the k-th smallest |τᵢ|,
  exactly as ``kthvalue`` over the whole tensor). A random sample of |τᵢ| gives an
  estimate and a bracket [low, high] that holds the exact value unless the sample
  was unlucky (≈ 3.6 standard errors).

  - Fused (CPU, large tensors): one pass trims with the estimate t̂ and, in the same
    kernel, counts per expert the entries below ``lower``, below t̂, at most t̂ and at
    most ``upper`` (inner boundaries that split the bracket into four sub-intervals)
    and flags, per entry and expert, the sub-interval its |τᵢ| lies in (3 bits per
    expert in int32 words). Afterwards the counts tell whether the estimate was exact
    (checkpoint task vectors are quantised, multiples of the base's bfloat16 ulp, so
    the threshold is a tie group that the sample often hits: a large group at t̂ is
    counted, not flagged) and otherwise which sub-interval holds the exact threshold;
    only the flagged entries between it and t̂ are gathered (to select it) and redone
    with it, in one fused kernel. With quantised values, a wrong estimate usually
    means a whole neighbouring tie group (≈ 1 % of the entries) changes sides.
  - Eager: a counting pass gathers the values inside the bracket (≈ 1 % of the
    tensor) and selects the exact threshold from them, then a second pass merges.

  Either way a missed bracket falls back to the exact ``kthvalue`` (and, fused, a
  repeated pass). The sample's order statistics come from a radix histogram (see
  :func:`_order_statistics`). The elected sign needs the global majority sign only
  for entries whose trimmed sum is exactly zero but non-empty; those entries (a few
  per cent of a quantised bfloat16 tensor, where ±1 ulp often cancel) are recorded
  and fixed after the pass if the majority turns out positive.
* Tensors of at most :data:`DENSE_MAX` entries (norms, biases) skip all this for
  TIES: the dense kernels in one piece are faster there.

Results are identical to the dense kernels (same float32 operations in the same
order per entry; DARE masks come from the counter-based generator of
:mod:`mergekit_mllm.ops.counter_rng`, a function of each entry's flat position, so
any chunking, and any subset of positions, sees the same mask; entries recomputed
after a fused pass go through the same float32 operations as the eager chunks).

On the CPU, large tensors run each pass as one fused inductor kernel
(:mod:`mergekit_mllm.ops.fused`: ahead-of-time packages or ``torch.compile``, same
expressions; eager fallback when compiling fails), except TIES's pass itself, which is one
hand-written C++ loop (:mod:`mergekit_mllm.ops.native`: the same float32 operations; the
inductor kernel where it does not apply or cannot be built).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_mllm.ops import counter_rng, elementwise, fused, native

#: TIES on tensors of at most this many entries runs in one piece through the dense kernels of
#: :mod:`mergekit_mllm.ops.elementwise` (whose numbers the streaming passes reproduce): the
#: streaming machinery's fixed costs (the threshold sample and its histogram, buffers, the
#: counting pass) were 2.1 ms per 1024-entry tensor (4.6 ms with DARE) against 0.3 ms (1.0 ms)
#: dense, and a 24-layer model has ~120 norms and biases; at 65 536 entries dense was 2× slower
#: (measured, N = 5). Weight Average and DARE+TA stream at every size (no fixed costs).
DENSE_MAX = 1 << 14
#: Elements per chunk on the CPU (1 MiB of float32 per row of the chunk buffer).
CPU_CHUNK = 1 << 18
#: Flagged entries are fixed up in blocks of this many (bounded temporaries).
FIX_BLOCK = 1 << 20
#: The smallest positive float32 (a subnormal): ``|τ| ≥`` it means ``τ ≠ 0``.
_SMALLEST_POSITIVE = float(torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)))
#: Random sample size for the TIES threshold bracket (at most; smaller tensors sample one
#: entry in SAMPLE_STRIDE, at least SAMPLE_MIN) and the bracket's half-width in quantile units at
#: SAMPLE_SIZE (≈ 3.6 standard errors of the sample quantile; widened for smaller samples).
SAMPLE_SIZE = 1 << 17
SAMPLE_STRIDE = 32
SAMPLE_MIN = 1 << 14
BRACKET = 0.004
#: The fused TIES pass also counts at ``lower``/``upper``, this fraction of the bracket's half-width
#: from the estimate (≈ 1.2 standard errors: the exact threshold lies within in ≈ 77 % of cases,
#: and then the fix-up gathers only the entries in that inner sub-interval).
INNER = 1 / 3


class NonFiniteInput(ValueError):
    """``index`` is -1 for the base model, else the expert's position."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


class _Inputs:
    """Flat views of base and experts, and reusable float32 chunk buffers."""

    def __init__(self, base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float],
                 dtype: torch.dtype, chunk: Optional[int]):
        self.base = base.reshape(-1)
        self.experts = [e.reshape(-1) for e in experts]
        self.weights = [float(w) for w in weights]
        self.n = self.base.numel()
        self.count = len(self.experts)
        #: run the fused (inductor-compiled) chunk kernels of mergekit_mllm.ops.fused
        self.fused = fused.wanted(self.n, base.device, dtype)
        if chunk is None:
            chunk = (fused.CHUNK if self.fused else CPU_CHUNK) if base.device.type == "cpu" else self.n
        self.chunk = max(1, min(chunk, self.n, fused.MAX_CHUNK if self.fused else self.n))
        self.dtype = dtype
        # the eager chunk buffers, allocated on first use (the fused kernels never need them: a
        # 20 MiB allocation per tensor left holes in the heap that RSS grew into, measured)
        self._base_buffer: Optional[torch.Tensor] = None
        self._tv_buffer: Optional[torch.Tensor] = None

    def spans(self):
        """Chunks of the tensor (never across a multiple of 2³¹: the DARE counters' split)."""
        return counter_rng.spans(self.n, self.chunk)

    def load(self, start: int, stop: int, check: bool = True):
        """(base chunk, weighted task-vector chunk N×c) in the compute dtype (buffers are reused)."""
        size = stop - start
        if self._base_buffer is None:
            self._base_buffer = torch.empty(self.chunk, dtype=self.dtype, device=self.base.device)
            self._tv_buffer = torch.empty((self.count, self.chunk), dtype=self.dtype, device=self.base.device)
        base = self._base_buffer[:size]
        base.copy_(self.base[start:stop])
        vectors = self._tv_buffer[:, :size]
        for index, expert in enumerate(self.experts):
            vectors[index].copy_(expert[start:stop])
        if check:
            # Any NaN/Inf in an input makes its sum non-finite (sum overflow of finite weights
            # is not a concern at checkpoint magnitudes); the exact check only runs then.
            if not bool(torch.isfinite(base.sum())):
                raise NonFiniteInput(-1)
            sums = vectors.sum(dim=1)
            if not bool(torch.isfinite(sums).all()):
                for index in range(self.count):
                    if not bool(torch.isfinite(vectors[index]).all()):
                        raise NonFiniteInput(index)
        vectors.sub_(base)
        for index, weight in enumerate(self.weights):
            vectors[index].mul_(weight)
        return base, vectors

    def raw(self, start: int, stop: int, dare: Optional["_Dare"]):
        """Kernel arguments of :mod:`fused` for one chunk: base and expert slices, the DARE keys."""
        keys = dare.kernel_keys(start) if dare is not None and dare.drop_rate > 0 else None
        return self.base[start:stop], [e[start:stop] for e in self.experts], keys

    def vectors_at(self, positions: torch.Tensor, dare: Optional["_Dare"] = None):
        """(base, weighted (DARE-dropped) τ N×k) at flat ``positions``, in the compute dtype: the
        same float32 operations as :meth:`load` and :meth:`_Dare.apply` on a chunk."""
        base = self.base[positions].to(self.dtype)
        vectors = torch.stack([(expert[positions].to(self.dtype) - base) * weight
                               for expert, weight in zip(self.experts, self.weights)])
        if dare is not None and dare.drop_rate > 0:
            for index in range(self.count):
                vectors[index].mul_(dare.keep_at(index, positions)).div_(1.0 - dare.drop_rate)
        return base, vectors


class _Dare:
    """Per-expert Bernoulli keep-masks of one tensor, computed from the entries' flat positions
    (:mod:`mergekit_mllm.ops.counter_rng`): the same mask in every pass, for any chunking, and at
    any subset of positions, with nothing drawn in order, stored or replayed."""

    def __init__(self, inputs: _Inputs, drop_rate: float, seed: int, tensor_name: Optional[str]):
        self.drop_rate = drop_rate
        self.inputs = inputs
        self.keys = [counter_rng.expert_key(seed, tensor_name, i) for i in range(inputs.count)]

    def apply(self, vectors: torch.Tensor, start: int) -> None:
        """Drop-and-rescale ``vectors`` (the chunk at flat position ``start``) in place."""
        if self.drop_rate == 0.0:
            return
        stop = start + vectors.shape[1]
        for index, key in enumerate(self.keys):
            keep = counter_rng.uniform_span(key, start, stop, vectors.device) >= self.drop_rate
            vectors[index].mul_(keep).div_(1.0 - self.drop_rate)

    def keep_at(self, index: int, positions: torch.Tensor) -> torch.Tensor:
        """Expert ``index``'s keep-mask at flat ``positions``."""
        return counter_rng.uniform_at(self.keys[index], positions) >= self.drop_rate

    def kernel_keys(self, start: int):
        """The fused kernels' DARE arguments for the chunk at ``start``: (lo of ``start`` as a 0-d
        int32 tensor, k1 and k2 per expert as int32 tensors)."""
        k1, k2, lo = counter_rng.span_keys(self.keys, start)
        device = self.inputs.base.device
        as_int32 = dict(dtype=torch.int32, device=device)
        return torch.tensor(lo, **as_int32), torch.tensor(k1, **as_int32), torch.tensor(k2, **as_int32)


def _chunks(inputs: _Inputs, dare: Optional[_Dare], check: bool = True):
    """(start, stop, base chunk, task-vector chunk) over the whole tensor, DARE applied when given."""
    for start, stop in inputs.spans():
        base, vectors = inputs.load(start, stop, check=check)
        if dare is not None:
            dare.apply(vectors, start)
        yield start, stop, base, vectors


class _FusedUnavailable(Exception):
    """Compiling or loading a fused kernel failed; the caller reruns the method eagerly."""


class _Fused:
    """Calls the :mod:`fused` kernels for one tensor with its constant arguments as tensors
    (one compiled graph per kernel, whatever λ, weights or drop rate)."""

    def __init__(self, inputs: _Inputs, dare: Optional[_Dare], scale: float):
        self.inputs = inputs
        self.dare = dare if dare is not None and dare.drop_rate > 0 else None
        f32 = dict(dtype=torch.float32, device=inputs.base.device)
        self.weights = torch.tensor(inputs.weights, **f32)
        rate = self.dare.drop_rate if self.dare is not None else 0.0
        # the keep test's integer form (counter_rng.keep_threshold): exactly the eager ``u >= rate``
        self.drop = torch.tensor(counter_rng.keep_threshold(rate), dtype=torch.int32, device=inputs.base.device)
        self.keep_divisor = torch.tensor(1.0 - rate, **f32)
        self.scale = torch.tensor(scale, **f32)
        self.scale_value = scale  # for the eager fix-up operations
        self._native = None  # the native TIES pass (looked up on first use)

    def chunks(self):
        for start, stop in self.inputs.spans():
            base, experts, keys = self.inputs.raw(start, stop, self.dare)
            yield start, stop, (base, experts, self.weights, keys, self.drop, self.keep_divisor)

    def call(self, name: str, *args):
        try:
            return fused.kernel(name)(*args)
        except Exception as error:  # compilation (no compiler, unsupported platform): eager from here on
            fused.disable(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            raise _FusedUnavailable() from error

    def native_ties(self):
        """The native one-loop TIES pass (:mod:`native`) for these inputs, or None (the inductor kernel)."""
        if self._native is None:
            inputs = self.inputs
            found = native.kernel(inputs.count, self.dare is not None, inputs.base.dtype,
                                  [expert.dtype for expert in inputs.experts]) if inputs.base.device.type == "cpu" else None
            self._native = found or False
        return self._native or None

    def ties_chunk(self, start: int, stop: int, args, arguments, out: torch.Tensor, counts: torch.Tensor,
                   flagged: "_Growable", flag_words: List["_Growable"], name: str) -> int:
        """The fused TIES pass over one chunk (see :func:`fused._ties_kernel`): writes ``out[start:stop]``,
        adds the chunk's counts to ``counts`` (int64, 4N), appends its flagged entries' positions and
        flag words to ``flagged`` and ``flag_words``; returns the chunk's Σ sign of the trimmed sums."""
        native_pass = self.native_ties()
        if native_pass is not None:
            length = stop - start
            positions = flagged.reserve(length)
            words = [buffer.reserve(length) for buffer in flag_words]
            found, signs, finite_inputs, finite_result = native_pass(
                args[0], args[1], self.weights, args[3], int(self.drop), float(self.keep_divisor), arguments,
                self.scale_value, out[start:stop], counts, start, positions, words)
            for buffer in (flagged, *flag_words):
                buffer.release(length - found)
            self.check_inputs(finite_inputs, start, stop)
            if not finite_result:
                raise FloatingPointError(name)
            return signs
        result, signs, words, counts_here, finite_inputs, finite_result = self.call(
            "ties", *args, *arguments, self.scale, out.dtype)
        self.check_inputs(finite_inputs, start, stop)
        if not bool(finite_result):
            raise FloatingPointError(name)
        counts += counts_here.to(torch.int64)
        any_flag = words[0] if len(words) == 1 else torch.stack(words).ne(0).any(dim=0)
        here = any_flag.nonzero().squeeze(1)
        if here.numel():
            torch.add(here, start, out=flagged.reserve(here.numel()))
            for word, buffer in zip(words, flag_words):
                torch.index_select(word, 0, here, out=buffer.reserve(here.numel()))
        out[start:stop].copy_(result)
        return int(signs)

    def _gathers_fused(self) -> bool:
        """Whether the kernels that read at flat positions apply (DARE's counters stay below 2³¹)."""
        return self.dare is None or self.inputs.n <= counter_rng.SPLIT

    def _at(self, where: torch.Tensor):
        """The position kernels' leading arguments for flat positions ``where``."""
        keys = self.dare.kernel_keys(0) if self.dare is not None else None
        return self.inputs.base, self.inputs.experts, self.weights, where, keys, self.drop, self.keep_divisor

    def vectors_at(self, where: torch.Tensor):
        """(base, weighted (DARE-dropped) τ N×k) at flat positions ``where``: the fused gather, or
        :meth:`_Inputs.vectors_at` where DARE's counters pass 2³¹ (same numbers)."""
        if not self._gathers_fused():
            return self.inputs.vectors_at(where, self.dare)
        return self.call("gather", *self._at(where))

    def retrim(self, where: torch.Tensor, estimate: torch.Tensor, threshold: torch.Tensor,
               keep_all: Sequence[bool], out_dtype: torch.dtype):
        """TIES at flat positions ``where`` with the trim ``threshold`` (N×1) instead of ``estimate``:
        (result in ``out_dtype``, Σ sign(new trimmed sum) − Σ sign(the estimate's), new "sum cancels
        to 0" flags, result finite), by the fused ``retrim`` kernel or the same float32 operations eagerly."""
        if self._gathers_fused():
            result, signs, undecided, finite = self.call("retrim", *self._at(where), estimate.view(-1),
                                                         threshold.view(-1), self.scale, out_dtype)
            return result, int(signs), undecided, finite
        base_at, vectors = self.inputs.vectors_at(where, self.dare)
        before = torch.where(vectors.abs() >= estimate, vectors, 0.0).sum(dim=0)
        result, total, count = _ties_entries(base_at, vectors, threshold, keep_all, self.scale_value)
        signs = int(torch.sign(total).sum()) - int(torch.sign(before).sum())
        result = result.to(out_dtype)
        return result, signs, (total == 0) & (count > 0), torch.isfinite(result).all()

    def check_inputs(self, finite, start: int, stop: int) -> None:
        """``finite``: the kernel's all-inputs-finite flag (a tensor, or a bool from the native pass)."""
        if not bool(finite):
            self.inputs.load(start, stop, check=True)  # raises NonFiniteInput naming the model


def _with_fallback(fused_version, eager_version):
    """Run ``fused_version`` when the inputs are fused; if compiling fails, ``eager_version``."""
    def run(inputs: _Inputs, *args, **kwargs):
        if inputs.fused:
            try:
                return fused_version(inputs, *args, **kwargs)
            except _FusedUnavailable:
                inputs.fused = False
        return eager_version(inputs, *args, **kwargs)
    return run


def _finish(result: torch.Tensor, out: torch.Tensor, start: int, stop: int, name: str) -> None:
    if not bool(torch.isfinite(result).all()):
        raise FloatingPointError(name)
    out[start:stop].copy_(result)


def _weight_average_eager(inputs: _Inputs, out: torch.Tensor, scale: float, name: str, dare: Optional[_Dare] = None,
                          reduce: str = "mean") -> None:
    for start, stop, base, vectors in _chunks(inputs, dare):
        merged = vectors.mean(dim=0) if reduce == "mean" else vectors.sum(dim=0)
        _finish(base.add_(scale * merged), out, start, stop, name)


def _weight_average_fused(inputs: _Inputs, out: torch.Tensor, scale: float, name: str, dare: Optional[_Dare] = None,
                          reduce: str = "mean") -> None:
    kernel = _Fused(inputs, dare, scale)
    for start, stop, args in kernel.chunks():
        result, finite_inputs, finite_result = kernel.call("sum", *args, kernel.scale, reduce == "mean", out.dtype)
        kernel.check_inputs(finite_inputs, start, stop)
        if not bool(finite_result):
            raise FloatingPointError(name)
        out[start:stop].copy_(result)


weight_average = _with_fallback(_weight_average_fused, _weight_average_eager)


# ---------------------------------------------------------------- TIES


class _Growable:
    """An append-only 1-D buffer with doubling capacity (one allocation: keeping hundreds of small
    per-chunk pieces alive between the chunk temporaries fragments the heap, and RSS grew by GBs)."""

    def __init__(self, capacity: int, dtype: torch.dtype, device):
        self.buffer = torch.empty(capacity, dtype=dtype, device=device)  # pages are touched only when written
        self.size = 0

    def reserve(self, count: int) -> torch.Tensor:
        """The next ``count`` entries of the buffer, to be written by the caller."""
        end = self.size + count
        if end > self.buffer.numel():
            grown = torch.empty(max(end, 2 * self.buffer.numel()), dtype=self.buffer.dtype, device=self.buffer.device)
            grown[: self.size].copy_(self.buffer[: self.size])
            self.buffer = grown
        view = self.buffer[self.size:end]
        self.size = end
        return view

    def release(self, count: int) -> None:
        """Give back the last ``count`` reserved entries (reserved but not written)."""
        self.size -= count

    def extend(self, values: torch.Tensor) -> None:
        self.reserve(values.numel()).copy_(values)

    def values(self) -> torch.Tensor:
        return self.buffer[: self.size]


@functools.lru_cache(maxsize=32)
def _sample_positions(n: int, size: int) -> torch.Tensor:
    """``size`` flat positions, one uniformly at random in each of ``size`` equal strata of ``0…n−1``:
    ascending (a cache-friendly gather) and unbiased (a plain stride aliases with the row and
    column structure of low-rank task vectors). Deterministic (seed 0) and so cached: a model's
    layers repeat a few shapes (callers only read the tensor)."""
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(0)
    offsets = torch.rand(size, dtype=torch.float64, generator=generator)
    positions = ((torch.arange(size, dtype=torch.float64) + offsets) * (n / size)).long()
    return positions.clamp_(max=n - 1)


def _sample_size(n: int) -> int:
    """Entries sampled for a tensor of ``n``: gathering them costs about as much per entry as a
    pass, so a tensor of a million entries samples 1/32 of them, not an eighth."""
    return min(n, SAMPLE_SIZE, max(SAMPLE_MIN, n // SAMPLE_STRIDE))


def _bracket_width(n: int) -> float:
    """The bracket's half-width in quantile units for a sample of ``_sample_size(n)``."""
    return BRACKET * math.sqrt(max(1.0, SAMPLE_SIZE / _sample_size(n)))


def _bracket(inputs: _Inputs, rank: int, dare: Optional[_Dare], vectors_at: Optional[Callable] = None):
    """Per expert, from a random sample of |τᵢ|: (low, high, estimate, lower, upper), columns N×1.
    The exact threshold (the ``rank``-th smallest |τᵢ|) lies in [low, high] unless the sample was
    unlucky (≈ 3.6 standard errors); counting over the whole tensor decides, and makes it exact.
    ``lower`` ≤ estimate ≤ ``upper`` are the sample quantiles :data:`INNER` of the way out to the
    bracket's ends (the fused pass also counts there, to narrow the fix-up)."""
    n = inputs.n
    device = inputs.base.device
    positions = _sample_positions(n, _sample_size(n)).to(device)
    # with the entries' own DARE masks (``vectors_at``: the fused gather, same numbers)
    _, vectors = vectors_at(positions) if vectors_at is not None else inputs.vectors_at(positions, dare)
    m = positions.numel()
    quantile = rank / n
    width = _bracket_width(n)  # the statistics below are 0-based ranks in the sample
    lo = math.floor((quantile - width) * m)
    hi = math.ceil((quantile + width) * m)
    middle = min(m - 1, max(0, round(quantile * m) - 1))
    inner_lo = min(middle, max(0, math.floor((quantile - INNER * width) * m)))
    inner_hi = max(middle, min(m - 1, math.ceil((quantile + INNER * width) * m)))
    first, last = min(max(lo, 0), m - 1), max(min(hi, m - 1), 0)
    ranks = sorted({first, inner_lo, middle, inner_hi, last})
    statistics = _order_statistics(vectors.abs(), ranks)
    at = {rank: statistics[:, i:i + 1].contiguous() for i, rank in enumerate(ranks)}
    low = at[first] if lo >= 0 else torch.full_like(at[first], -1.0)
    high = at[last] if hi < m else torch.full_like(at[last], math.inf)
    return low, high, at[middle], at[inner_lo], at[inner_hi]


#: The order statistics' first level: float32 bit patterns shifted by this many bits (sign,
#: exponent and 7 mantissa bits: bins 1/128 of an octave wide), one count per bin and row.
_RADIX_SHIFT = 16
_RADIX_BINS = 1 << 15


def _order_statistics(samples: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """The 0-based order statistics ``ranks`` (ascending) of each row of ``samples`` (N×m, ≥ 0,
    not NaN), exactly: N×len(ranks).

    A radix selection: the bit patterns of non-negative floats order like the values, so one
    histogram of their top 16 bits per row (a ``bincount``) and its running sum tell which bin
    holds each rank and how many entries lie below it; then only the bins between the first and
    the last rank are sorted (a few per cent of the sample). A row whose window is large (a big
    tie group: quantised task vectors, DARE's zeros) selects within each needed bin instead.
    ``kthvalue`` per rank cost ≈ 10 ns per sampled entry, each (quickselect's branches, measured);
    this is a few ns per entry for all ranks together."""
    count, m = samples.shape
    if samples.dtype != torch.float32:  # e.g. float64 checkpoints: one selection per rank
        return torch.stack([torch.stack([row.kthvalue(rank + 1).values for rank in ranks]) for row in samples])
    device = samples.device
    key = torch.bitwise_and(samples.view(torch.int32) >> _RADIX_SHIFT, _RADIX_BINS - 1)
    offsets = torch.arange(count, dtype=torch.int32, device=device).unsqueeze(1) * _RADIX_BINS
    histogram = torch.bincount((key + offsets).view(-1), minlength=count * _RADIX_BINS)
    cumulative = histogram.view(count, _RADIX_BINS).cumsum(dim=1)
    wanted = torch.tensor(ranks, dtype=cumulative.dtype, device=device).expand(count, -1).contiguous()
    bins = torch.searchsorted(cumulative, wanted, right=True)  # the bin holding each rank
    below = torch.where(bins > 0, cumulative.gather(1, (bins - 1).clamp(min=0)), 0)  # entries in lower bins
    window = (key >= bins[:, :1]) & (key <= bins[:, -1:])
    sizes = window.sum(dim=1).tolist()
    result = torch.empty((count, len(ranks)), dtype=samples.dtype, device=device)
    limit = max(4096, m // 16)
    for row in range(count):
        if sizes[row] <= limit:  # the usual case: sort the bins between the first and the last rank
            ordered = samples[row][window[row]].sort().values
            result[row] = ordered[wanted[row] - below[row, 0]]
            continue
        in_bin = {}
        for index, (bin_, rank, before) in enumerate(zip(bins[row].tolist(), ranks, below[row].tolist())):
            if bin_ not in in_bin:
                in_bin[bin_] = samples[row][key[row] == bin_]
            result[row, index] = in_bin[bin_].kthvalue(rank - before + 1).values
    return result


def _thresholds(inputs: _Inputs, density: float, dare: Optional[_Dare]) -> List[Optional[torch.Tensor]]:
    """Per expert: the k-th smallest |τᵢ| (k = ⌊n(1 − density)⌋), exactly, or None (keep all)."""
    n = inputs.n
    rank = int(n * (1.0 - density))
    if rank <= 0:
        return [None] * inputs.count
    device = inputs.base.device
    low, high = _bracket(inputs, rank, dare)[:2]

    # Counts below / at the low end / at the high end, values strictly inside: checkpoint task
    # vectors are quantised (multiples of the base's bf16 ulp), so the ends are often large ties.
    below = torch.zeros(inputs.count, dtype=torch.int64, device=device)
    at_low = torch.zeros(inputs.count, dtype=torch.int64, device=device)
    at_high = torch.zeros(inputs.count, dtype=torch.int64, device=device)
    # Values inside the bracket go straight into one preallocated buffer per expert (sized from
    # the sample, doubled if needed): keeping hundreds of small per-chunk pieces alive between the
    # chunk temporaries fragments the heap, and RSS grew by GBs that way.
    capacity = int(2 * (2 * max(_bracket_width(n), 0.0)) * n) + 4096
    inside = [_Growable(capacity, inputs.dtype, device) for _ in range(inputs.count)]
    for _, _, _, vectors in _chunks(inputs, dare):
        magnitudes = vectors.abs_()
        below += (magnitudes < low).sum(dim=1)
        at_low += (magnitudes == low).sum(dim=1)
        at_high += (magnitudes == high).sum(dim=1)
        window = (magnitudes > low) & (magnitudes < high)
        for index in range(inputs.count):
            inside[index].extend(magnitudes[index][window[index]])

    thresholds: List[Optional[torch.Tensor]] = []
    for index in range(inputs.count):
        values = inside[index].values()
        below_i, at_low_i = int(below[index]), int(at_low[index])
        inside_i = below_i + at_low_i + values.numel()
        if below_i < rank <= below_i + at_low_i:
            thresholds.append(low[index, 0])
        elif below_i + at_low_i < rank <= inside_i:
            thresholds.append(values.kthvalue(rank - below_i - at_low_i).values)
        elif low[index, 0] < high[index, 0] and inside_i < rank <= inside_i + int(at_high[index]):
            thresholds.append(high[index, 0])
        else:  # the sample's bracket missed: exact selection over the whole tensor
            thresholds.append(_exact_threshold(inputs, index, rank, dare))
    return thresholds


def _exact_threshold(inputs: _Inputs, index: int, rank: int, dare: Optional[_Dare]) -> torch.Tensor:
    parts = [vectors[index].abs() for _, _, _, vectors in _chunks(inputs, dare, check=False)]
    return torch.cat(parts).kthvalue(rank).values


def _count_along_experts(mask: torch.Tensor) -> torch.Tensor:
    # bool → uint8 view summed in uint8 is ~3× faster than a bool sum over dim 0 (N ≤ 255)
    if mask.shape[0] < 256:
        return mask.view(torch.uint8).sum(dim=0, dtype=torch.uint8)
    return mask.sum(dim=0)


def _concat(parts: List[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)


def _threshold_column(inputs: _Inputs, thresholds: List[Optional[torch.Tensor]]) -> torch.Tensor:
    zero = torch.zeros((), dtype=inputs.dtype, device=inputs.base.device)
    return torch.stack([t if t is not None else zero for t in thresholds]).unsqueeze(1)


def _ties_entries(base: torch.Tensor, vectors: torch.Tensor, threshold: torch.Tensor, keep_all: Sequence[bool],
                  scale: float):
    """TIES on a block of entries (base: c, weighted task vectors: N×c, both overwritten):
    (base + scale·merged, trimmed sum, count of agreeing entries). The elected sign of a zero
    sum is provisionally "negative" (agreeing entries are the negative ones), which is right
    unless the majority sign turns out positive: such entries are fixed after the pass."""
    trimmed = vectors
    if not all(keep_all):
        trimmed.mul_(vectors.abs() >= threshold)  # ties at the threshold survive; keep-all rows: |τ| ≥ 0
    total = trimmed.sum(dim=0)
    sign = (total > 0).to(trimmed.dtype).mul_(2).sub_(1)
    aligned = trimmed.mul_(sign)  # > 0 exactly where an entry agrees with the sign
    count = _count_along_experts(aligned > 0)
    kept = aligned.clamp_(min=0).sum(dim=0).mul_(sign)  # Σ of agreeing entries (×±1 is exact)
    merged = kept.div_(count.clamp(min=1).to(kept.dtype))
    return base.add_(merged.mul_(scale)), total, count


def _positive_majority_entries(base: torch.Tensor, vectors: torch.Tensor, threshold: torch.Tensor,
                               keep_all: Sequence[bool], scale: float) -> torch.Tensor:
    """Entries whose trimmed sum is zero, under a positive majority sign: base + scale · the mean
    of the positive entries."""
    trimmed = vectors if all(keep_all) else vectors * (vectors.abs() >= threshold)
    agrees = trimmed > 0
    merged = (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)
    return base + scale * merged


def _ties_eager(inputs: _Inputs, out: torch.Tensor, scale: float, name: str, density: float,
                dare: Optional[_Dare] = None) -> None:
    thresholds = _thresholds(inputs, density, dare)
    keep_all = [t is None for t in thresholds]
    threshold = _threshold_column(inputs, thresholds)
    sign_total = torch.zeros((), dtype=torch.int64, device=inputs.base.device)
    # flat positions whose trimmed sum is 0 with a non-zero entry (one growable buffer: see _thresholds)
    undecided = _Growable(4096, torch.int64, inputs.base.device)
    for start, stop, base, vectors in _chunks(inputs, dare):
        result, total, count = _ties_entries(base, vectors, threshold, keep_all, scale)
        sign_total += torch.sign(total).sum().to(torch.int64)
        undecided_here = (total == 0) & (count > 0)  # cancelling entries, not all-zero ones
        if bool(undecided_here.any()):
            undecided.extend(undecided_here.nonzero().squeeze(1) + start)
        _finish(result, out, start, stop, name)
    if undecided.size and int(sign_total) > 0:
        positions = undecided.values()
        _fix_positive_majority(inputs, out, scale, positions, threshold, keep_all, dare)


def _fix_positive_majority(inputs, out, scale, positions, threshold, keep_all, dare) -> None:
    """Recompute entries whose sum was zero: with a positive majority they average the positive entries."""
    base, trimmed = inputs.vectors_at(positions, dare)
    out[positions] = _positive_majority_entries(base, trimmed, threshold, keep_all, scale).to(out.dtype)


def _ties_fused(inputs: _Inputs, out: torch.Tensor, scale: float, name: str, density: float,
                dare: Optional[_Dare] = None) -> None:
    """TIES in one fused pass: trim with each expert's threshold estimated from a sample (``t̂``),
    and in the same pass count the entries below and at most ``t̂`` (and at the inner boundaries
    ``lower``/``upper`` of the sample's bracket) and flag, per expert, which sub-interval of the
    bracket each entry's |τᵢ| lies in. Afterwards the exact thresholds follow from the counts
    (checkpoint task vectors are quantised, so the exact one is often ``t̂`` itself) or from the
    flagged entries of the sub-interval that holds each, and the few entries that they trim
    differently are recomputed eagerly (same float32 operations: bit-identical to the two-pass
    computation). A large tie group at ``t̂`` is not flagged (it would be most of the flagged
    entries); if a bracket missed (rare), the thresholds are found exactly and the pass repeated."""
    n = inputs.n
    rank = int(n * (1.0 - density))
    keep_all = [rank <= 0] * inputs.count
    kernel = _Fused(inputs, dare, scale)
    if rank > 0:
        low, high, estimate, lower, upper = _bracket(inputs, rank, dare, kernel.vectors_at)
        # the bracket's top in the tie group of t̂: the group is counted, not flagged
        excluded = torch.where((high == estimate) & (estimate > 0), estimate, -2.0)
        bracket = _Bracket(estimate, low, high, excluded, lower, upper)
    else:  # keep everything: threshold 0, an empty bracket (nothing is flagged)
        bracket = _Bracket.empty(torch.zeros((inputs.count, 1), dtype=inputs.dtype, device=inputs.base.device))
    exact = _ties_fused_pass(kernel, out, name, rank, keep_all, bracket)
    if exact is not None:  # a bracket missed: the exact thresholds were computed; trim with them
        _ties_fused_pass(kernel, out, name, rank, keep_all, _Bracket.empty(exact), exact=True)


class _Bracket:
    """Per-expert columns (N×1) of the fused TIES pass: the estimate t̂ and the sample's bracket
    [low, high] around it, split at ``lower`` ≤ t̂ ≤ ``upper``, and ``excluded`` (a tie group at t̂
    that is counted, not flagged; −2 for none). Zero entries (unchanged weights, DARE's drops:
    often most of a tensor) contribute nothing whether trimmed or kept, so they are never flagged:
    the bracket starts at the smallest positive float at the lowest."""

    def __init__(self, estimate, low, high, excluded, lower, upper):
        self.estimate = estimate
        self.starts_at_zero = low <= 0  # then every entry below the bracket is a zero
        self.low = low.clamp(min=_SMALLEST_POSITIVE)
        self.high, self.excluded = high, excluded
        self.lower = torch.minimum(torch.maximum(lower, self.low), estimate)
        self.upper = torch.minimum(torch.maximum(upper, estimate), torch.maximum(high, estimate))

    @classmethod
    def empty(cls, estimate):
        """No bracket: the estimates are exact (or keep everything); only zero sums are flagged."""
        none = torch.full_like(estimate, -2.0)
        return cls(estimate, none, none, none, none, none)

    def arguments(self):
        return tuple(column.view(-1) for column in (self.estimate, self.low, self.high, self.excluded, self.lower,
                                                     self.upper))


def _flag_code_in(words: List[torch.Tensor], index: int, first: int, last: int) -> torch.Tensor:
    """Whether expert ``index``'s 3-bit sub-interval code (see :func:`fused._ties_kernel`) in the
    flag ``words`` lies in ``first … last`` (the field is masked in place, not shifted out)."""
    word, slot = divmod(index, fused.EXPERTS_PER_WORD)
    shift = 1 + 3 * slot
    field = torch.bitwise_and(words[word], 7 << shift)
    return (field >= first << shift) & (field <= last << shift)


def _ties_fused_pass(kernel: "_Fused", out, name, rank, keep_all, bracket: _Bracket,
                     exact: bool = False) -> Optional[torch.Tensor]:
    """One fused pass with the trim thresholds ``bracket.estimate`` (N×1), then the fix-up to the
    exact thresholds (``exact``: the estimate is exact already). Returns None when done, or the
    exact thresholds (N×1) when a bracket missed and the pass must be repeated with them."""
    inputs, dare, scale = kernel.inputs, kernel.dare, kernel.scale_value
    device = inputs.base.device
    estimate = bracket.estimate
    arguments = bracket.arguments()
    sign_total = 0
    counts = torch.zeros(4 * inputs.count, dtype=torch.int64, device=device)
    # the flagged entries' flat positions and flag words (room for the usual 5–10 %: pages are
    # touched only as they are written, and a doubling copies)
    capacity = inputs.n // 8 + 4096
    flagged = _Growable(capacity, torch.int64, device)
    flag_words = [_Growable(capacity, torch.int32, device) for _ in range(-(-inputs.count // fused.EXPERTS_PER_WORD))]
    for start, stop, args in kernel.chunks():
        sign_total += kernel.ties_chunk(start, stop, args, arguments, out, counts, flagged, flag_words, name)
    counts = counts.view(inputs.count, 4)  # |τᵢ| < lower, < t̂, ≤ t̂, ≤ upper
    positions, words = flagged.values(), [buffer.values() for buffer in flag_words]

    def blocks(positions: torch.Tensor):
        """``positions`` in blocks of FIX_BLOCK entries: the fix-up holds a few MiB, not a copy of the tensor."""
        for begin in range(0, positions.numel(), FIX_BLOCK):
            # a copy, not a view: a view's base size is a guard of the compiled kernels (recompiles)
            yield positions[begin:begin + FIX_BLOCK].clone()

    # Per expert whose exact threshold is not the estimate: the code of the sub-interval holding
    # it, and the codes of the entries it trims differently (those between it and t̂).
    thresholds: List[Optional[torch.Tensor]] = [None] * inputs.count
    unresolved: Dict[int, Tuple[int, int, int]] = {}  # index -> (code, first and last code to redo)
    for index in range(inputs.count):
        if exact:
            thresholds[index] = estimate[index, 0]
        elif not keep_all[index]:
            below_lower, below, at_most, at_most_upper = counts[index].tolist()
            if below < rank <= at_most:  # the usual case: the exact threshold is the estimate
                thresholds[index] = estimate[index, 0]
            elif rank <= below:  # below t̂: in [low, lower) or [lower, t̂)
                code = 1 if rank <= below_lower else 2
                unresolved[index] = (code, code, 2)
            else:  # above t̂: in (t̂, upper] or (upper, high]
                code = 3 if rank <= at_most_upper else 4
                unresolved[index] = (code, 3, code)
    redo = torch.empty(0, dtype=torch.int64, device=device)
    redo_flagged = None  # which flagged entries are redone (a mask over ``positions``)
    if unresolved:
        for index, (_, first, last) in unresolved.items():
            inside = _flag_code_in(words, index, first, last)
            redo_flagged = inside if redo_flagged is None else redo_flagged.logical_or_(inside)
        redo = positions[redo_flagged]

    # the exact thresholds: the sub-interval's values, ranked after the entries below it
    ranges = {1: (bracket.low, bracket.lower, False), 2: (bracket.lower, estimate, False),
              3: (estimate, bracket.upper, True), 4: (bracket.upper, bracket.high, True)}
    values_in = {index: [] for index in unresolved}
    for block in blocks(redo):
        magnitudes = kernel.vectors_at(block)[1].abs_()
        for index, (code, _, _) in unresolved.items():
            start_at, end_at, open_start = ranges[code]
            values = magnitudes[index]
            first = values > start_at[index, 0] if open_start else values >= start_at[index, 0]
            last = values <= end_at[index, 0] if open_start else values < end_at[index, 0]
            values_in[index].append(values[first.logical_and_(last)])
    missed = []
    for index, (code, _, _) in unresolved.items():
        below_lower, below, at_most, at_most_upper = counts[index].tolist()
        inside = _concat(values_in[index], inputs.dtype, device)
        before = {1: below_lower - inside.numel(), 2: below_lower, 3: at_most, 4: at_most_upper}[code]
        found = None
        if before < rank <= before + inside.numel():
            found = inside.kthvalue(rank - before).values
        elif code == 1 and rank <= before and bool(bracket.starts_at_zero[index, 0]):
            found = torch.zeros((), dtype=inputs.dtype, device=device)  # more than `rank` zeros
        thresholds[index] = found
        if found is None:  # the sample's bracket missed
            missed.append(index)
    del values_in
    if missed:
        for index in missed:
            thresholds[index] = _exact_threshold(inputs, index, rank, dare)
        return _threshold_column(inputs, thresholds)
    threshold = _threshold_column(inputs, thresholds)

    # Redo every entry between t̂ and an exact threshold with the exact ones (an entry both trim
    # alike is recomputed bit for bit); the zero sums among them replace the pass's.
    still_undecided = []
    for block in blocks(redo):
        result, signs, undecided, finite = kernel.retrim(block, estimate, threshold, keep_all, out.dtype)
        if not bool(finite):
            raise FloatingPointError(name)
        sign_total += signs
        out[block] = result
        still_undecided.append(block[undecided])
    if sign_total > 0:  # entries whose trimmed sum is 0 take the positive majority's sign
        undecided = torch.bitwise_and(words[0], 1).bool()
        if redo_flagged is not None:  # the re-trim decided those afresh (``still_undecided``)
            undecided = torch.cat([positions[undecided.logical_and_(~redo_flagged)], *still_undecided])
        else:
            undecided = positions[undecided]
        for block in blocks(undecided):
            base_at, vectors = kernel.vectors_at(block)
            out[block] = _positive_majority_entries(base_at, vectors, threshold, keep_all, scale).to(out.dtype)
    return None


ties = _with_fallback(_ties_fused, _ties_eager)


# ---------------------------------------------------------------- entry point


def merge(method: str, base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], *,
          scale: float, dtype: torch.dtype, name: str = "<unnamed tensor>", density: float = 0.2,
          drop_rate: float = 0.0, seed: int = 0, tensor_name: Optional[str] = None,
          chunk: Optional[int] = None) -> torch.Tensor:
    """``base + scale·τ_m`` for an element-wise ``method``, in ``base.dtype``.

    Raises :class:`NonFiniteInput` for a NaN/Inf input and ``FloatingPointError`` for a
    non-finite result.
    """
    inputs = _Inputs(base, experts, weights, dtype, chunk)
    small = chunk is None and inputs.n <= DENSE_MAX and not inputs.fused
    if small and method in ("ties_merging", "dare_ties_merging"):
        return _merge_dense(method, inputs, scale=scale, name=name, density=density, drop_rate=drop_rate, seed=seed,
                            tensor_name=tensor_name).view(base.shape)
    out = torch.empty(inputs.n, dtype=base.dtype, device=base.device)
    dare = _Dare(inputs, drop_rate, seed, tensor_name) if method.startswith("dare_") else None
    if method == "weight_average":
        weight_average(inputs, out, scale, name)
    elif method == "dare_task_arithmetic":
        weight_average(inputs, out, scale, name, dare=dare, reduce="sum")
    elif method in ("ties_merging", "dare_ties_merging"):
        ties(inputs, out, scale, name, density, dare=dare)
    else:
        raise KeyError(method)
    return out.view(base.shape)


def _merge_dense(method: str, inputs: _Inputs, *, scale: float, name: str, density: float, drop_rate: float,
                 seed: int, tensor_name: Optional[str]) -> torch.Tensor:
    """TIES (with DARE) on a small tensor in one piece (see :data:`DENSE_MAX`): the dense kernels on
    the stacked task vectors (the definition the streaming passes reproduce bit for bit), with the
    same input and result checks."""
    base, vectors = inputs.load(0, inputs.n)  # one chunk: the whole tensor, checked
    if method == "ties_merging":
        merged = elementwise.ties_merging(vectors, density=density)
    elif method == "dare_ties_merging":
        merged = elementwise.dare_ties_merging(vectors, density=density, drop_rate=drop_rate, seed=seed,
                                               tensor_name=tensor_name)
    else:
        raise KeyError(method)
    result = base + scale * merged
    if not bool(torch.isfinite(result).all()):
        raise FloatingPointError(name)
    return result.to(inputs.base.dtype)


STREAMING_METHODS = ("weight_average", "ties_merging", "dare_task_arithmetic", "dare_ties_merging")
