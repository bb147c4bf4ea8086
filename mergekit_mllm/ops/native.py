"""The fused TIES pass as one hand-written C++ loop (``native_ties.cpp``), loaded with ``ctypes``.

The inductor kernel of :func:`mergekit_mllm.ops.fused._ties_kernel` computes the same numbers,
but with DARE inductor materialises each expert's task vector (the mask's hash makes it a "large"
expression with many users) and splits the pass into eight loops over the chunk; and streaming then
ran ``nonzero`` and ``index_select`` over the flag words to keep the flagged entries. Here one loop
computes every expert's task vector, mask, counts, flag code and the merged entry while the values
are in registers, and writes the flagged entries compacted. Per 5 × 1 M bfloat16 entries (one
thread, measured on the development VM): 6.6 ms with DARE against 9.0 ms for the inductor kernel
plus 1.4 ms for ``nonzero``; 3.9 ms against 6.1 ms without DARE.

The per-entry operations are those of the inductor kernel, in the same order, compiled with
``-ffp-contract=off``: the results are bit-identical (``tests/test_fused.py`` runs the fused TIES
tests with both). Each variant (number of experts, DARE on/off, bfloat16 or float32) is compiled
once per machine with the C++ compiler inductor uses (``CXX``, else ``g++``; ≈1 s) and cached in
the packages' directory (:func:`fused.cache_root`, under ``native/``); if that fails, the inductor
kernel is used (reported once). ``MERGEKIT_MLLM_NATIVE=0`` turns it off, ``1`` makes a failed
build an error. With more than one torch intra-op thread a chunk is split into spans run on a
thread pool (``ctypes`` releases the GIL).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_mllm.ops import fused

SOURCE = Path(__file__).with_name("native_ties.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC"]
#: experts per variant at most (the stack arrays of the C++ loop; the inductor kernel takes more)
MAX_EXPERTS = 64
#: entries per thread at least when a chunk is split across torch's intra-op threads
MIN_SPAN = 1 << 16
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}

_libraries: Dict[tuple, Optional["_TiesPass"]] = {}
_failed: Optional[str] = None
_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def mode() -> str:
    """``MERGEKIT_MLLM_NATIVE``: ``auto`` (default: native where it applies and builds, else the
    inductor kernel), ``1`` (required: a failed build is an error) or ``0`` (never)."""
    return fused.switch("MERGEKIT_MLLM_NATIVE")


def enabled() -> bool:
    current = mode()
    return current == "on" or (current == "auto" and _failed is None)


def disable(reason: str) -> None:
    global _failed
    if _failed is None:
        print(f"mergekit-mllm: the native TIES kernel is unavailable ({reason}); the inductor kernel is used "
              "(set MERGEKIT_MLLM_NATIVE=0 to skip the attempt)", file=sys.stderr)
    _failed = reason


def kernel(count: int, dare: bool, dtype: torch.dtype, experts_dtypes: Sequence[torch.dtype]) -> Optional["_TiesPass"]:
    """The native pass for ``count`` experts (DARE on/off) whose base and experts are all ``dtype``,
    or None where it does not apply (another dtype, too many experts, disabled or failed to build)."""
    if not enabled() or dtype not in _DTYPES or count > MAX_EXPERTS or any(d != dtype for d in experts_dtypes):
        return None
    key = (count, bool(dare), dtype)
    with _lock:
        if _libraries.get(key) is None:
            _libraries[key] = _load(*key)
    return _libraries[key]


def _identity() -> str:
    """What a library depends on besides its variant: the source, the compiler flags and the toolchain."""
    return json.dumps([hashlib.sha256(SOURCE.read_bytes()).hexdigest(), FLAGS, *fused.toolchain()])


def _macros(count: int, dare: bool, dtype: torch.dtype) -> List[str]:
    return [f"-DMM_EXPERTS={count}", f"-DMM_DARE={int(dare)}", f"-DMM_BF16={_DTYPES[dtype]}",
            f"-DMM_PER_WORD={fused.EXPERTS_PER_WORD}"]


def library_path(count: int, dare: bool, dtype: torch.dtype) -> Path:
    digest = hashlib.sha256((json.dumps(_macros(count, dare, dtype)) + _identity()).encode()).hexdigest()[:24]
    return fused.cache_root() / "native" / f"ties-{count}-{digest}.so"


def _load(count: int, dare: bool, dtype: torch.dtype) -> Optional["_TiesPass"]:
    path = library_path(count, dare, dtype)
    try:
        if not path.exists():
            _build(count, dare, dtype, path)
        return _TiesPass(ctypes.CDLL(str(path)), count, dtype)
    except Exception as error:  # no compiler, an unsupported platform: the inductor kernel
        message = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {message[0] if message else ''}"
        if mode() == "on":
            raise RuntimeError(f"MERGEKIT_MLLM_NATIVE=1, but the native TIES kernel could not be built ({reason})") \
                from error
        disable(reason)
        return None


def _build(count: int, dare: bool, dtype: torch.dtype, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    command = [fused.compiler(), *FLAGS, *_macros(count, dare, dtype), "-o", str(temporary), str(SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:1])} exited with {done.returncode}: {done.stderr.strip()[:500]}")
        os.replace(temporary, path)  # atomic: a concurrent merge never loads half a library
    finally:
        if temporary.exists():
            temporary.unlink()


def _threads(length: int) -> int:
    return max(1, min(torch.get_num_threads(), length // MIN_SPAN))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergekit-mllm-ties")
        return _pool


class _TiesPass:
    """``mm_ties_pass`` of one compiled variant."""

    def __init__(self, library: ctypes.CDLL, count: int, dtype: torch.dtype):
        function = library.mm_ties_pass
        pointer, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
        function.argtypes = [pointer, pointer, pointer, i32, pointer, pointer, i32, f32, pointer, pointer, pointer,
                             pointer, pointer, pointer, f32, i64, pointer, pointer, pointer, pointer, i64, pointer,
                             pointer]
        function.restype = i64
        self.function = function
        self.count = count
        self.dtype = dtype
        self.words = -(-count // fused.EXPERTS_PER_WORD)

    def __call__(self, base: torch.Tensor, experts: Sequence[torch.Tensor], weights: torch.Tensor, keys,
                 drop: int, keep_divisor: float, bracket: Sequence[torch.Tensor], scale: float, out: torch.Tensor,
                 counts: torch.Tensor, position0: int, flagged: torch.Tensor, words: Sequence[torch.Tensor]):
        """One chunk: writes ``out`` (its merged entries), adds to ``counts`` (int64, 4N), writes the
        flagged entries' positions and words to the starts of ``flagged`` and ``words`` (each at
        least the chunk's length) and returns (how many were flagged, Σ sign of the trimmed sums,
        inputs finite, results finite)."""
        length = base.numel()
        tensors = [base, *experts, weights, out, counts, flagged, *words, *bracket]
        if keys is not None:
            tensors += list(keys[1:])
        for tensor in tensors:
            if not tensor.is_contiguous() or tensor.device.type != "cpu":
                raise ValueError("the native TIES kernel takes contiguous CPU tensors")
        expected = {"values": self.dtype, "float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
        kinds = ([("values", t) for t in (base, *experts, out)] + [("float32", t) for t in (weights, *bracket)]
                 + [("int64", counts), ("int64", flagged)] + [("int32", w) for w in words]
                 + ([("int32", t) for t in keys[1:]] if keys is not None else []))
        for kind, tensor in kinds:
            if tensor.dtype != expected[kind]:
                raise TypeError(f"the native TIES kernel for {self.dtype} got a {tensor.dtype} tensor ({kind})")
        if len(experts) != self.count or len(words) != self.words or len(bracket) != 6:
            raise ValueError("the native TIES kernel got another variant's arguments")
        if (any(t.numel() != length for t in (*experts, out)) or counts.numel() != 4 * self.count
                or any(t.numel() != self.count for t in (weights, *bracket))
                or any(t.numel() < length for t in (flagged, *words))):
            raise ValueError("the native TIES kernel got arguments of the wrong lengths")
        expert_pointers = (ctypes.c_void_p * self.count)(*[e.data_ptr() for e in experts])
        word_pointers = (ctypes.c_void_p * self.words)(*[w.data_ptr() for w in words])
        lo, k1, k2 = (int(keys[0]), keys[1].data_ptr(), keys[2].data_ptr()) if keys is not None else (0, None, None)
        fixed = [tensor.data_ptr() for tensor in bracket]
        size = base.element_size()
        threads = _threads(length)
        bounds = [length * part // threads for part in range(threads + 1)]
        signs = torch.zeros(threads, dtype=torch.int64)
        nonfinite = torch.zeros((threads, 2), dtype=torch.int32)
        span_counts = [counts] + [torch.zeros_like(counts) for _ in range(threads - 1)]

        def run(part: int) -> int:
            begin = bounds[part]
            shifted_experts = (ctypes.c_void_p * self.count)(*[p + begin * size for p in expert_pointers])
            shifted_words = (ctypes.c_void_p * self.words)(*[p + begin * 4 for p in word_pointers])
            return self.function(base.data_ptr() + begin * size, shifted_experts, weights.data_ptr(),
                                 lo + begin, k1, k2, drop, keep_divisor, *fixed, scale, bounds[part + 1] - begin,
                                 out.data_ptr() + begin * size, span_counts[part].data_ptr(),
                                 signs[part:].data_ptr(), nonfinite[part].data_ptr(), position0 + begin,
                                 flagged.data_ptr() + begin * 8, shifted_words)

        if threads == 1:
            found = [run(0)]
        else:
            futures = [_executor(threads - 1).submit(run, part) for part in range(1, threads)]
            found = [run(0)] + [future.result() for future in futures]
            for part in range(1, threads):
                counts += span_counts[part]
        # the spans' flagged entries are written at their spans' starts: move them together
        total = found[0]
        for part in range(1, threads):
            begin, here = bounds[part], found[part]
            if here and begin != total:
                for buffer in (flagged, *words):
                    buffer[total:total + here] = buffer[begin:begin + here].clone()
            total += here
        return total, int(signs.sum()), not bool(nonfinite[:, 0].any()), not bool(nonfinite[:, 1].any())
