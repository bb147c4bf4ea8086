"""Fused (inductor-compiled) chunk kernels for the streaming element-wise methods.

Eager PyTorch runs TIES as ~20 separate passes over each chunk (abs, compares,
bool→float multiplies, reductions, each with a fresh temporary); the memory
traffic, not the arithmetic, is the cost. Inductor fuses each pass of
:mod:`mergekit_mllm.ops.streaming` into one C++ loop that reads the bfloat16
inputs once and writes the result once.

The kernels compute the same float32 expressions as the eager code, in the same
order per entry, so the trim thresholds and the merged tensors are bit-identical
to the eager (and dense) ones — asserted by ``tests/test_fused.py`` and by the
end-to-end test that runs stock ``mergekit-yaml`` both ways.

When it is used (``MERGEKIT_MLLM_COMPILE``):

* ``auto`` (default): on the CPU, for tensors of at least :data:`MIN_ELEMENTS`
  entries. A 7B model's large matrices repay a kernel's compilation many times, a tiny
  test model would not.
* ``1``: for every CPU tensor (tests); ``0``: never.

How they are compiled (``MERGEKIT_MLLM_COMPILE_BACKEND``):

* ``aot`` (default): each kernel variant (number of experts, dtypes, DARE on/off) is
  exported once per machine and compiled into an ahead-of-time inductor package
  (≈10 s each on a 2-core CPU, ≈30 s for the very first, which also builds inductor's
  precompiled header; cached under :func:`cache_root`). A merging process loads the
  packages with torch's C++ loader in milliseconds and never imports dynamo or inductor.
* ``jit``: ``torch.compile`` in the process: ≈1.3 s to import dynamo and inductor and
  ≈1.6 s to trace TIES's kernel and load it from inductor's cache (≈0.3 s for each
  fix-up kernel) in every process — 3–4 s of a small model's 8 s merge — but a variant
  compiles in a few seconds the first time (the test suite uses it).

If compilation fails (no C++ compiler, unsupported platform) a warning is
printed once and the eager path is used for the rest of the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from mergekit_mllm.ops import counter_rng

#: ``auto`` compiles only for tensors at least this large (262 144 entries: every matrix of a 0.5B+
#: model, e.g. Qwen2-VL-7B's k/v 1.8 M; the fused kernels beat eager from ~130 K entries, but a
#: tiny model, like the offline benchmark's or the tests', would not repay the compile).
MIN_ELEMENTS = 1 << 18
#: elements per chunk for the fused kernels (they need no cache-sized temporaries)
CHUNK = 1 << 20
#: the most entries per chunk (the kernels' int32 counts are exact far beyond)
MAX_CHUNK = 1 << 24

_kernels: Dict[str, Callable] = {}
_failed: Optional[str] = None


def switch(variable: str) -> str:
    """An ``auto``/``1``/``0`` environment switch (default ``auto``): "auto", "on" or "off"."""
    value = os.environ.get(variable, "auto").strip().lower()
    if value in ("0", "false", "off", "no", "never"):
        return "off"
    if value in ("1", "true", "on", "yes", "always"):
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{variable}={value!r}: use auto, 1 or 0")


def mode() -> str:
    return switch("MERGEKIT_MLLM_COMPILE")


def wanted(numel: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a tensor of ``numel`` entries on ``device`` (compute dtype ``dtype``) uses the fused kernels."""
    if _failed is not None or device.type != "cpu" or dtype != torch.float32:
        return False
    current = mode()
    return current == "on" or (current == "auto" and numel >= MIN_ELEMENTS)


def disable(reason: str) -> None:
    """Fall back to eager for the rest of the process (reported once)."""
    global _failed
    if _failed is None:
        print(f"mergekit-mllm: fused kernels unavailable ({reason}); element-wise methods run eagerly "
              "(set MERGEKIT_MLLM_COMPILE=0 to skip the attempt)", file=sys.stderr)
    _failed = reason


# ---------------------------------------------------------------- kernels (traced by inductor)


def _task_vectors(base, experts, weights, dare_keys, drop, keep_divisor):
    """The eager ``_Inputs.load`` + ``_Dare.apply``: (float32 base, [weighted (DARE-dropped) τᵢ], inputs finite).

    ``dare_keys`` (or None): the chunk's counter offset and the experts' keys; the masks are
    computed here by the same hash as eagerly (integer ops: bit-identical), and kept where
    ``bits24 >= drop`` (``drop``: :func:`counter_rng.keep_threshold` as an int32 tensor), which is
    exactly the eager ``uniform >= drop_rate`` without a conversion and a multiply per entry.

    One 1-D tensor per expert, not an N×c stack: inductor vectorises the 1-D loops, and the
    stacked layout with dynamic shapes ran ~4× slower (measured)."""
    b = base.to(torch.float32)
    finite = torch.isfinite(b).all()
    counters = None
    if dare_keys is not None:
        lo, k1, k2 = dare_keys
        counters = torch.arange(b.shape[0], dtype=torch.int32, device=b.device) + lo
    vectors = []
    for index, expert in enumerate(experts):
        tv = (expert.to(torch.float32) - b) * weights[index]
        finite = finite & torch.isfinite(tv).all()
        if counters is not None:
            tv = tv * (counter_rng.bits24(counters, k1[index], k2[index]) >= drop) / keep_divisor
        vectors.append(tv)
    return b, vectors, finite


def _sum_kernel(base, experts, weights, dare_keys, drop, keep_divisor, scale, mean: bool, out_dtype: torch.dtype):
    b, vectors, finite = _task_vectors(base, experts, weights, dare_keys, drop, keep_divisor)
    total = vectors[0]
    for tv in vectors[1:]:
        total = total + tv
    merged = total / len(vectors) if mean else total
    result = b + scale * merged
    return result.to(out_dtype), finite, torch.isfinite(result).all()


#: Experts per int32 flag word of the TIES kernel (3 bits each, above the "undecided" bit 0).
EXPERTS_PER_WORD = 10


def _ties_kernel(base, experts, weights, dare_keys, drop, keep_divisor, threshold, low, high, excluded, lower, upper,
                 scale, out_dtype: torch.dtype):
    """TIES on one chunk with the provisional per-expert trim ``threshold`` (t̂), plus what makes it
    exact afterwards.

    Per expert, four counts: |τᵢ| < ``lower``, < t̂, ≤ t̂ and ≤ ``upper`` (``low`` ≤ ``lower`` ≤ t̂ ≤
    ``upper`` ≤ ``high`` split the sample's bracket into four sub-intervals); they tell which
    sub-interval holds the exact threshold. Per entry, flag words (int32, :data:`EXPERTS_PER_WORD`
    experts each): bit 0 of the first word = the trimmed sum cancels to 0 (its sign is the global
    majority's, decided after the pass); bits 1 + 3k … 3 + 3k = expert k's code: 0 outside the
    bracket (or zero, or in a large tie group ``excluded`` at t̂ that only the counts describe),
    1 in [low, lower), 2 in [lower, t̂), 3 in [t̂, upper], 4 in (upper, high]. The fix-up then
    gathers only the entries in the sub-intervals between t̂ and each exact threshold.

    Every reduction is an int32 sum (exact: a chunk has at most :data:`MAX_CHUNK` entries). float32
    sums go through inductor's cascade-summation helper (for accuracy, over more than 4096 entries):
    10.9 ms per 5 × 1 M entries with DARE against 9.5 ms (measured); int64 and boolean accumulators
    made inductor split the kernel into four loops, twice as slow."""
    b, vectors, finite = _task_vectors(base, experts, weights, dare_keys, drop, keep_divisor)
    trimmed, counts = [], []
    words = [None] * (-(-len(vectors) // EXPERTS_PER_WORD))
    for index, tv in enumerate(vectors):
        magnitude = tv.abs()
        keep = magnitude >= threshold[index]
        above_lower = magnitude >= lower[index]
        beyond_upper = magnitude > upper[index]
        trimmed.append(torch.where(keep, tv, 0.0))
        for below in (~above_lower, ~keep, magnitude <= threshold[index], ~beyond_upper):
            counts.append(_count(below))
        inside = (magnitude >= low[index]) & (magnitude <= high[index]) & (magnitude != excluded[index])
        code = inside.to(torch.int32) * (1 + above_lower.to(torch.int32) + keep.to(torch.int32)
                                         + beyond_upper.to(torch.int32))
        word, slot = divmod(index, EXPERTS_PER_WORD)
        code = code * (2 ** (1 + 3 * slot))
        words[word] = code if words[word] is None else words[word] + code
    merged, total, count = _merge_trimmed(trimmed)
    undecided = (total == 0) & (count > 0)  # non-empty entries whose trimmed sum cancels to 0
    words[0] = words[0] + undecided.to(torch.int32)
    result = (b + merged * scale).to(out_dtype)
    return (result, _count(torch.sign(total)), tuple(words), torch.stack(counts), finite,
            torch.isfinite(result).all())


def _count(values):
    """Σ of 0/1 (or ±1) values as an int32 sum (see ``_ties_kernel``)."""
    return values.to(torch.int32).sum(dtype=torch.int32)


def _merge_trimmed(trimmed):
    """TIES's sign election and disjoint mean of trimmed task vectors: (merged, trimmed sum, count
    of agreeing entries). A zero sum elects "negative" provisionally (see ``_ties_kernel``)."""
    total = trimmed[0]
    for tv in trimmed[1:]:
        total = total + tv
    sign = torch.where(total > 0, 1.0, -1.0)
    count = None
    kept = None
    for tv in trimmed:
        aligned = tv * sign
        agree = (aligned > 0).to(torch.int32)
        count = agree if count is None else count + agree
        positive = aligned.clamp(min=0)
        kept = positive if kept is None else kept + positive
    return (kept * sign) / count.clamp(min=1), total, count


def _gathered(base, experts, weights, positions, dare_keys, drop, keep_divisor):
    """(float32 base, [weighted (DARE-dropped) τᵢ]) at flat ``positions`` (int64, below 2³¹ with
    DARE): the same float32 operations as ``_task_vectors``."""
    b = base[positions].to(torch.float32)
    if dare_keys is not None:
        _, k1, k2 = dare_keys
        counters = positions.to(torch.int32)
    vectors = []
    for index, expert in enumerate(experts):
        tv = (expert[positions].to(torch.float32) - b) * weights[index]
        if dare_keys is not None:
            tv = tv * (counter_rng.bits24(counters, k1[index], k2[index]) >= drop) / keep_divisor
        vectors.append(tv)
    return b, vectors


def _gather_kernel(base, experts, weights, positions, dare_keys, drop, keep_divisor):
    """The fix-up's inputs at flat ``positions``: (float32 base, N×F weighted (DARE-dropped) τ) in
    one loop (eagerly, the gathers, conversions and the masks' integer hash were ~20 passes)."""
    b, vectors = _gathered(base, experts, weights, positions, dare_keys, drop, keep_divisor)
    return b, torch.stack(vectors)


def _retrim_kernel(base, experts, weights, positions, dare_keys, drop, keep_divisor, estimate, threshold, scale,
                   out_dtype: torch.dtype):
    """TIES at flat ``positions`` with the exact trim ``threshold`` instead of the pass's ``estimate``:
    (result, Σ sign(new trimmed sum) − Σ sign(the pass's), new "sum cancels to 0" flags). The same
    float32 operations as ``_ties_kernel`` per entry, so an entry that both trim alike gets the
    pass's result bit for bit: the fix-up can rewrite every entry it gathered."""
    b, vectors = _gathered(base, experts, weights, positions, dare_keys, drop, keep_divisor)
    before = None
    trimmed = []
    for index, tv in enumerate(vectors):
        magnitude = tv.abs()
        old = torch.where(magnitude >= estimate[index], tv, 0.0)
        before = old if before is None else before + old
        trimmed.append(torch.where(magnitude >= threshold[index], tv, 0.0))
    merged, total, count = _merge_trimmed(trimmed)
    result = (b + merged * scale).to(out_dtype)
    return (result, _count(torch.sign(total)) - _count(torch.sign(before)), (total == 0) & (count > 0),
            torch.isfinite(result).all())


_SOURCES = {"sum": _sum_kernel, "ties": _ties_kernel, "gather": _gather_kernel, "retrim": _retrim_kernel}

#: Graph variants allowed per kernel. Each number of experts, input dtype and DARE on/off is one
#: variant (shapes are dynamic); dynamo's default limit of 8 per function was reached in one
#: process that merged with N = 2…8 (a sweep, a benchmark, the synthetic study), and with
#: ``fullgraph`` that is a hard failure: every later merge of the process fell back to eager.
RECOMPILE_LIMIT = 64


def _limit_patch():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(RECOMPILE_LIMIT, getattr(config, name))})


def remember_vector_isa_probe() -> Optional[bool]:
    """Skip inductor's per-process probe of the CPU's vector instruction sets where it passed before.

    Before it loads or builds a CPU kernel, inductor checks every vector ISA that ``/proc/cpuinfo``
    reports (AVX2, AVX-512, …) by compiling a test library and ``dlopen``-ing it in a child Python,
    in every process: 0.78 s per merge process here (measured), a large share of a small model's
    merge. The outcome depends only on those CPU flags, the C++ compiler and torch, so it is
    probed once per combination and remembered in inductor's cache directory; when every reported
    ISA passed, later processes set inductor's own switch for it (``cpp.vec_isa_ok = True``), which
    selects the same ISAs without the probe (and is set in the probing process too: it is part of
    the kernels' cache key). Returns True when set from the remembered probe, False when probed
    now, None when not applicable (not x86, already configured, or anything failed: then
    inductor probes as usual)."""
    try:
        from torch._inductor import config, cpu_vec_isa
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        if config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
            return None
        flags = cpu_vec_isa.x86_isa_checker()
        reported = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                    if all(flag in flags for flag in str(isa).split())]
        # the compiler as toolchain() names it (inductor's own choice on Linux: CXX, else g++)
        identity = [torch.__version__, reported, *toolchain()[2:]]
        located = identity[3]
        digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
        marker = Path(cache_dir()) / "mergekit_mllm" / f"vec_isa_ok-{digest}.json"
        if marker.exists():
            config.cpp.vec_isa_ok = True
            return True
        if reported and [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] == reported:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"torch": identity[0], "isas": reported, "compiler": located}))
            # the switch is part of inductor's cache key: set it in this process too, or the
            # next process would miss the kernels compiled here and compile them again
            config.cpp.vec_isa_ok = True
        return False
    except Exception:  # an inductor internal moved: leave the probe to inductor
        return None


def backend() -> str:
    """``MERGEKIT_MLLM_COMPILE_BACKEND``: ``aot`` (default) or ``jit``, see :func:`kernel`."""
    value = os.environ.get("MERGEKIT_MLLM_COMPILE_BACKEND", "aot").strip().lower()
    if value in ("aot", "jit"):
        return value
    raise ValueError(f"MERGEKIT_MLLM_COMPILE_BACKEND={value!r}: use aot or jit")


def kernel(name: str) -> Callable:
    """The compiled kernel ``name``, called with the source function's arguments.

    ``aot`` (:class:`_AotKernel`): one ahead-of-time inductor package per variant, built once per
    machine and loaded by torch's C++ loader — no dynamo or inductor in the merging process.
    ``jit``: ``torch.compile``, traced in every process (≈1.3 s to import dynamo and inductor,
    ≈0.3–1.6 s per kernel to trace and load); compiles faster the first time (tests use it)."""
    chosen = backend()
    compiled = _kernels.get(f"{chosen}:{name}")
    if compiled is None:
        if chosen == "aot":
            compiled = _AotKernel(name)
        else:
            if not any(key.startswith("jit:") for key in _kernels):
                remember_vector_isa_probe()
            inner = torch.compile(_SOURCES[name], dynamic=True, fullgraph=True)

            def compiled(*args):
                with _limit_patch():
                    return inner(*args)

        _kernels[f"{chosen}:{name}"] = compiled
    return compiled


# ---------------------------------------------------------------- ahead-of-time packages


#: The arguments whose length varies between calls (per kernel): the chunk's or tensor's base and
#: experts, and the flat positions of the kernels that read at positions. Every other tensor
#: argument (weights, thresholds, DARE keys: one entry per expert; scalars) has a fixed shape per
#: variant.
_DYNAMIC = {"sum": {0: "L", 1: "L"}, "ties": {0: "L", 1: "L"}, "gather": {0: "L", 1: "L", 3: "P"},
            "retrim": {0: "L", 1: "L", 3: "P"}}
#: example lengths for export (distinct, and not 0 or 1, which export would specialise on)
_EXAMPLE_LENGTHS = {"L": 4099, "P": 2053}


def cache_root() -> Path:
    """Where the packages are kept: ``MERGEKIT_MLLM_KERNEL_CACHE``, else ``mergekit_mllm/aot`` in
    inductor's cache directory (``TORCHINDUCTOR_CACHE_DIR``, else ``<tmp>/torchinductor_<user>``,
    computed as inductor does without importing it: importing inductor costs ≈1 s)."""
    explicit = os.environ.get("MERGEKIT_MLLM_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not inductor:
        import getpass
        import re
        import tempfile

        try:
            user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
        except (KeyError, OSError):
            user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
        inductor = os.path.join(tempfile.gettempdir(), "torchinductor_" + user)
    return Path(inductor) / "mergekit_mllm" / "aot"


_identity: Optional[str] = None


def _machine_identity() -> str:
    """What a package depends on besides its graph: torch, this module's and the counter RNG's
    source, the CPU's instruction-set flags (packages are built for the host's ISA) and the C++
    compiler. Computed once per process."""
    global _identity
    if _identity is None:
        sources = [Path(__file__).read_bytes(), Path(counter_rng.__file__).read_bytes()]
        _identity = json.dumps([torch.__version__, *toolchain(), [hashlib.sha256(source).hexdigest()
                                                                   for source in sources]])
    return _identity


def compiler() -> str:
    """The C++ compiler the packages and the native kernel are keyed by: ``CXX``, else ``g++``."""
    return os.environ.get("CXX") or "g++"


def toolchain() -> list:
    """What a compiled kernel depends on besides its source: the machine, the CPU's instruction-set
    flags (kernels are built for the host's ISA) and the C++ compiler (name, path, modification time)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    located = os.path.realpath(shutil.which(compiler()) or compiler())
    return [platform.machine(), flags, compiler(), located,
            os.stat(located).st_mtime_ns if os.path.exists(located) else None]


def _flatten(args):
    """The leaves of a kernel call's arguments (tensors and static values), their structure, and
    the argument each leaf belongs to."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(list(args))
    positions = []
    for position, argument in enumerate(args):
        positions += [position] * len(pytree.tree_leaves(argument))
    return leaves, spec, positions


def _signature(value, dynamic: bool, tensors: list):
    """A hashable signature of one kernel argument (appending its tensors to ``tensors`` in the
    order of :func:`_flatten`'s leaves): dtype, rank, device and, unless ``dynamic``, shape per
    tensor; the structure and the values of everything else (typed: True is not 1.0)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return (value.dtype, value.dim(), value.device, None if dynamic else tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_signature(item, dynamic, tensors) for item in value))
    return (type(value), value)


class _AotKernel:
    """Kernel ``name`` through ahead-of-time inductor packages (``torch._inductor.aoti_compile_and_package``).

    A variant is the call's argument structure with its non-tensor values (number of experts,
    DARE on/off, output dtype, ``mean``), the tensors' dtypes and the fixed-shape tensors' shapes,
    and the thread count (inductor bakes it into the kernel's OpenMP loop). Each variant is
    exported once per machine with dynamic lengths, compiled and cached under :func:`cache_root`
    (written to a temporary name, then renamed: concurrent merges never read half a package);
    every later process loads it with ``torch._C._aoti.AOTIModelPackageLoader`` in milliseconds.
    The package runs the same inductor C++ kernel as ``torch.compile`` would generate: the
    results are bit-identical to the eager and dense ones (``tests/test_fused.py``)."""

    def __init__(self, name: str):
        self.name = name
        self.dynamic = _DYNAMIC[name]
        self.variants: Dict[tuple, tuple] = {}

    def __call__(self, *args):
        from torch.utils import _pytree as pytree

        # per call (a hot path: one call per chunk) only a hashable signature is built; the
        # package's cache key is derived from the arguments once per variant and process
        tensors: list = []
        signature = (tuple(_signature(argument, position in self.dynamic, tensors)
                           for position, argument in enumerate(args)), torch.get_num_threads())
        variant = self.variants.get(signature)
        if variant is None:
            variant = self.variants[signature] = self._load(self._key(args), args)
        loader, out_spec = variant
        # the package indexes its inputs as exported (contiguous): a strided view, e.g. a column
        # of a matrix, would be read as if it were contiguous, silently wrong
        tensors = [tensor if tensor.is_contiguous() else tensor.contiguous() for tensor in tensors]
        return pytree.tree_unflatten(loader.run(tensors), out_spec)

    def _key(self, args) -> str:
        """The variant's cache key (see the class docstring), from the arguments' leaves in order."""
        leaves, spec, positions = _flatten(args)
        kinds = []
        for leaf, position in zip(leaves, positions):
            if isinstance(leaf, torch.Tensor):
                dynamic = position in self.dynamic
                kinds.append((str(leaf.dtype), leaf.dim(), None if dynamic else list(leaf.shape), str(leaf.device)))
            else:
                kinds.append(repr(leaf))
        return json.dumps([self.name, str(spec), kinds, torch.get_num_threads()])

    def _load(self, key: str, args) -> tuple:
        digest = hashlib.sha256((key + _machine_identity()).encode()).hexdigest()[:24]
        path = cache_root() / f"{self.name}-{digest}.pt2"
        spec_path = path.with_suffix(".json")
        if not (path.exists() and spec_path.exists()):
            self._build(args, path, spec_path)
        try:
            return self._open(path, spec_path)
        except Exception as error:  # a damaged package (e.g. a full disk): rebuild it once
            print(f"mergekit-mllm: the cached kernel package {path} could not be loaded "
                  f"({type(error).__name__}); building it again", file=sys.stderr)
            for stale in (path, spec_path):
                stale.unlink(missing_ok=True)
            self._build(args, path, spec_path)
            return self._open(path, spec_path)

    @staticmethod
    def _open(path: Path, spec_path: Path) -> tuple:
        from torch.utils import _pytree as pytree

        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        out_spec = pytree.treespec_loads(json.loads(spec_path.read_text())["out_spec"])
        return loader, out_spec

    def _build(self, args, path: Path, spec_path: Path) -> None:
        from torch.utils import _pytree as pytree

        print(f"mergekit-mllm: compiling the fused {self.name!r} kernel for this variant "
              f"(once per machine, ≈10–60 s; cached in {path.parent})", file=sys.stderr)
        leaves, spec, positions = _flatten(args)
        slots, examples, shapes = [], [], []
        dims = {name: torch.export.Dim(name, min=1, max=(1 << 40)) for name in set(self.dynamic.values())}
        for slot, (leaf, position) in enumerate(zip(leaves, positions)):
            if not isinstance(leaf, torch.Tensor):
                continue
            slots.append(slot)
            dim = self.dynamic.get(position)
            if dim is None:
                examples.append(leaf.detach().clone())
                shapes.append(None)
            elif dim == "P":  # flat positions into a tensor of the example length
                examples.append(torch.arange(_EXAMPLE_LENGTHS["P"], dtype=leaf.dtype, device=leaf.device))
                shapes.append({0: dims[dim]})
            else:
                examples.append(torch.zeros(_EXAMPLE_LENGTHS[dim], dtype=leaf.dtype, device=leaf.device))
                shapes.append({0: dims[dim]})
        source = _SOURCES[self.name]

        class Graph(torch.nn.Module):
            def forward(self, *tensors):
                filled = list(leaves)
                for slot, tensor in zip(slots, tensors):
                    filled[slot] = tensor
                return source(*pytree.tree_unflatten(filled, spec))

        from torch._inductor import aoti_compile_and_package

        remember_vector_isa_probe()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
        spec_temporary = spec_path.with_name(f".{spec_path.name}.{os.getpid()}.tmp")
        try:
            with warnings.catch_warnings():  # torch's own deprecation notices from inside export/inductor
                warnings.simplefilter("ignore", FutureWarning)
                program = torch.export.export(Graph(), tuple(examples), dynamic_shapes=(tuple(shapes),),
                                              strict=False)
                aoti_compile_and_package(program, package_path=str(temporary))
            spec_temporary.write_text(json.dumps({"out_spec": pytree.treespec_dumps(program.call_spec.out_spec)}))
            os.replace(spec_temporary, spec_path)
            os.replace(temporary, path)
        finally:
            for leftover in (temporary, spec_temporary):
                if leftover.exists():
                    leftover.unlink()
