"""Time per weight matrix at Qwen2-VL-7B shapes, ours against the baselines.

For every shape and number of experts N, in one process and side by side:

* mergekit's ``task_arithmetic`` on the same matrices (the cheapest merge);
* WUDI: our Gram-form Adam steps vs the authors' autograd formulation;
* OptMerge ``lora``: our spectral solve (the exact 300 momentum steps from one
  eigendecomposition) and our Gram-form SGD steps vs the authors' autograd
  formulation (projectors zero-padded to m×n, as released) and the unpadded
  one (k×n projectors);
* OptMerge ``full``: our Gram-form Adam steps vs the authors' formulation;
* the closed forms (exact minimisers, SWUDI, ASWUDI), one-shot.

Iterative methods are timed over a few steps after their set-up and
extrapolated to 300 steps (the full autograd reference takes hours on CPU);
every figure says whether it was measured whole or extrapolated. Task vectors
are dense seeded Gaussians in float32 (content does not change the step cost;
dense spectra are the slow case for eigh/SVD).
"""

from __future__ import annotations

import gc
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.api import merge_tensors

from benchmarks.baselines import autograd_descent, padded_projectors
from benchmarks.common import (
    RESULTS_DIR,
    best_of,
    environment,
    load_json,
    log_progress,
    matmul_throughput,
    save_json,
    timed,
    timed_with_peak_memory,
)
from mergekit_mllm.ops import closed_form, fused, native
from mergekit_mllm.ops.interference import (
    _Gradient,
    _make_optimizer,
    optmerge_problem,
    run_interference_descent,
    wudi_problem,
)

ITERATIONS = 300  # the released setting for WUDI and both OptMerge variants
WUDI_LR, LORA_LR, FULL_LR, MOMENTUM = 1e-5, 1e-4, 1e-5, 0.9

# Qwen2-VL-7B language model: hidden 3584, MLP 18944, 28 heads / 4 KV heads, 28 layers.
SHAPES: Dict[str, Tuple[int, int]] = {
    "q_proj, o_proj": (3584, 3584),
    "k_proj, v_proj": (512, 3584),
    "gate_proj, up_proj": (18944, 3584),
    "down_proj": (3584, 18944),
}
MATRICES_PER_LAYER = {"q_proj, o_proj": 2, "k_proj, v_proj": 2, "gate_proj, up_proj": 2, "down_proj": 1}
LAYERS = 28
TARGET = ((18944, 3584), 5)

# On a (shared, 2-core) CPU the full sweep of the large shapes takes many
# hours; these are the expert counts run there by default (all of 2…8 for
# the small k/v shape and on a GPU).
CPU_LARGE_EXPERTS = (2, 5, 8)
# Largest eigendecomposition attempted on a CPU (≈ 3 min at 8192 on 2 cores).
CPU_EIGH_LIMIT = 8192


def default_plan(device: torch.device, quick: bool = False) -> List[Tuple[str, Tuple[int, int], int]]:
    """(label, shape, N) triples to measure."""
    if quick:
        return [("quick", (256, 128), 3), ("quick", (128, 256), 3)]
    plan = []
    for label, shape in SHAPES.items():
        large = shape[0] * shape[1] > 4096 * 1024
        counts = CPU_LARGE_EXPERTS if (large and device.type == "cpu") else range(2, 9)
        plan.extend((label, shape, n) for n in counts)
    # The headline figure first, then N = 5 everywhere (the whole-model estimate).
    target_experts = TARGET[1]
    return sorted(plan, key=lambda item: ((item[1], item[2]) != TARGET, item[2] != target_experts))


def select_plan(
    device: torch.device, experts: Optional[Sequence[int]] = None, shapes: Optional[Sequence[str]] = None
) -> List[Tuple[str, Tuple[int, int], int]]:
    """The plan for ``--experts`` / ``--shapes``: the given N (default: the device's default
    counts per shape) on the given shapes (``ROWSxCOLS``; default: all four)."""
    wanted = None
    if shapes is not None:
        known = {f"{rows}x{cols}": (rows, cols) for rows, cols in SHAPES.values()}
        unknown = [s for s in shapes if s.strip().lower().replace("×", "x") not in known]
        if unknown:
            raise ValueError(f"--shapes: unknown shape(s) {', '.join(unknown)}; known: {', '.join(known)}")
        wanted = {known[s.strip().lower().replace("×", "x")] for s in shapes}
    if experts is not None and any(n < 1 for n in experts):
        raise ValueError(f"--experts: every N must be at least 1, got {list(experts)}")
    defaults = default_plan(device)
    plan = []
    for label, shape in SHAPES.items():
        if wanted is not None and shape not in wanted:
            continue
        counts = experts if experts is not None else [n for _, s, n in defaults if s == shape]
        plan.extend((label, shape, n) for n in counts)
    return plan


def make_task_vectors(shape: Tuple[int, int], experts: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (1e-3 * torch.randn((experts, *shape), generator=generator)).to(device)


def _steps_to_time(macs_per_step: float) -> int:
    if macs_per_step > 1e11:
        return 2
    if macs_per_step > 1e9:
        return 10
    return 50


def _time_gram_steps(problem, optimizer: str, lr: float, momentum: float, device) -> Dict[str, Any]:
    """Set-up (C or B, D) and per-step time of run_interference_descent's loop."""
    m, n = problem.init.shape
    setup, gradient = timed(lambda: _Gradient(problem, ITERATIONS), device)
    parameter = torch.nn.Parameter(problem.init.clone())
    parameter.grad = torch.empty_like(parameter)
    opt = _make_optimizer(parameter, optimizer, lr, momentum)

    def steps(count):
        for _ in range(count):
            gradient(parameter.detach(), out=parameter.grad)
            opt.step()

    step_macs = m * n * (2 * problem.total_rank if gradient.factored else n)
    count = _steps_to_time(step_macs)
    steps(1)  # warm-up (first optimiser step allocates its state)
    seconds, _ = timed(lambda: steps(count), device)
    per_step = seconds / count
    return {
        "setup": setup,
        "per_iteration": per_step,
        "timed_iterations": count,
        "seconds": setup + ITERATIONS * per_step,
        "extrapolated": True,
        "form": "factor" if gradient.factored else "gram",
    }


def _time_autograd_steps(problem, optimizer: str, lr: float, momentum: float, device, budget: float, throughput):
    """Per-step time of the autograd formulation, extrapolated to 300 steps."""
    m, n = problem.init.shape
    rows = sum(p.shape[0] for p in problem.projectors)
    step_macs = 2 * m * n * rows  # forward (τ−Tᵢ)Pᵢᵀ and backward to τ
    estimate = step_macs / throughput
    if estimate > budget:
        return {"skipped": f"one step estimated at {estimate:.0f}s > budget {budget:.0f}s"}
    count = 1 if step_macs > 1e11 else (3 if step_macs > 1e9 else 10)
    if step_macs <= 1e11:
        autograd_descent(problem, optimizer=optimizer, lr=lr, iterations=1, momentum=momentum)  # warm-up
    seconds, _ = timed(
        lambda: autograd_descent(problem, optimizer=optimizer, lr=lr, iterations=count, momentum=momentum), device
    )
    per_step = seconds / count
    return {
        "per_iteration": per_step,
        "timed_iterations": count,
        "seconds": ITERATIONS * per_step,
        "extrapolated": True,
    }


def _time_once(function: Callable[[], Any], device, repeats: int = 1) -> Dict[str, Any]:
    if repeats > 1:
        function()
        return {"seconds": best_of(repeats, function, device), "extrapolated": False, "repeats": repeats}
    seconds, _ = timed(function, device)
    return {"seconds": seconds, "extrapolated": False}


def _time_merge_tensors(inputs, method: str, parameters, device, repeats: int) -> Dict[str, Any]:
    def call():
        return merge_tensors(inputs, method, base_index=0, name="model.layers.0.mlp.up_proj.weight", parameters=parameters)

    call()  # untimed: the fused kernels compile (or load from inductor's cache) on a first call per process
    gc.collect()
    runs = [timed_with_peak_memory(call, device) for _ in range(repeats)]
    unit = inputs[0].numel() * inputs[0].element_size()
    return {
        "seconds": min(seconds for seconds, _ in runs),
        "extrapolated": False,
        "repeats": repeats,
        "input_dtype": str(inputs[0].dtype),
        "peak_extra_bytes": max(extra for _, extra in runs),
        "peak_extra_tensors": max(extra for _, extra in runs) / unit,
    }


def _guard(name: str, function: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    try:
        return function()
    except torch.cuda.OutOfMemoryError as error:  # pragma: no cover - GPU only
        torch.cuda.empty_cache()
        return {"skipped": f"out of device memory: {str(error).splitlines()[0]}"}


ELEMENTWISE = (
    ("task_arithmetic", {"weight": 1.0}),
    ("weight_average", {}),
    ("ties_merging", {}),
    ("dare_task_arithmetic", {}),
    ("dare_ties_merging", {}),
)


def measure_elementwise(base, vectors, device, repeats: int, record: Callable[[str, Callable[[], Dict[str, Any]]], None]) -> None:
    """Element-wise methods through mergekit's API (the adapter path of a merge) on bfloat16
    inputs like real checkpoints, with the memory each call held beyond its inputs (in units of
    one input tensor); task_arithmetic is measured first and last (drift of a shared machine).
    Each measurement goes to ``record(name, function)``."""
    inputs = [base.bfloat16()] + [(base + tv).bfloat16() for tv in vectors]
    for method, parameters in ELEMENTWISE:
        record(method, lambda method=method, parameters=parameters: _time_merge_tensors(inputs, method, parameters, device, repeats))
    record("task_arithmetic.again", lambda: _time_merge_tensors(inputs, "task_arithmetic", {"weight": 1.0}, device, repeats))


def remeasure_elementwise(device: torch.device, *, save_as: Optional[str] = None, log: Callable[[str], None] = print):
    """Re-time only the element-wise methods of every saved kernel entry (same shapes, same seeds)."""
    name = save_as or f"kernels_{device.type}"
    data = load_json(RESULTS_DIR / f"{name}.json")
    for entry in data["entries"]:
        shape, experts = tuple(entry["shape"]), entry["experts"]
        m, n = shape
        repeats = 5 if m * n <= 1024 * 1024 else 3  # best of: these take seconds, and the machine is shared
        vectors = make_task_vectors(shape, experts, device)
        base = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        with log_progress(f"{shape} N={experts} element-wise methods", log):
            measure_elementwise(base, vectors, device, repeats,
                                lambda key, function: entry["results"].__setitem__(key, _guard(key, function)))
        entry["elementwise_environment"] = environment(device)
        entry["elementwise_environment"]["load_average"] = os.getloadavg()
        entry["elementwise_environment"]["fused_min_elements"] = fused.MIN_ELEMENTS
        entry["elementwise_environment"]["compile_backend"] = fused.backend()
        entry["elementwise_environment"]["ties_pass"] = "native" if native.enabled() else "inductor"
        del vectors, base
        gc.collect()
        save_json(name, data)
    return data


def measure(
    shape: Tuple[int, int],
    experts: int,
    device: torch.device,
    *,
    throughput: float,
    budget: float,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Every method on one (shape, N); returns {method: measurement}."""
    m, n = shape
    repeats = 3 if m * n <= 1024 * 1024 else 1
    vectors = make_task_vectors(shape, experts, device)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    out: Dict[str, Any] = {}

    def record(name: str, function: Callable[[], Dict[str, Any]]) -> None:
        with log_progress(f"{shape} N={experts} {name}", log):
            out[name] = _guard(name, function)
        gc.collect()

    # Elementwise methods through mergekit's API (the adapter path of a merge),
    # on bfloat16 inputs like real checkpoints; with the memory each call held
    # beyond its inputs, in units of one input tensor.
    measure_elementwise(base, vectors, device, repeats, record)

    # WUDI.
    wudi = wudi_problem(vectors)
    record("wudi.ours", lambda: _time_gram_steps(wudi, "adam", WUDI_LR, 0.0, device))
    record("wudi.autograd", lambda: _time_autograd_steps(wudi, "adam", WUDI_LR, 0.0, device, budget, throughput))
    del wudi

    # OptMerge lora.
    fraction = 1.0 / experts
    problem_seconds, lora = timed(lambda: optmerge_problem(vectors, variant="lora", rank_fraction=fraction), device)
    out["optmerge_lora.problem"] = {"seconds": problem_seconds, "extrapolated": False}

    def spectral():
        result = _time_once(
            lambda: run_interference_descent(
                lora, optimizer="sgd", lr=LORA_LR, iterations=ITERATIONS, momentum=MOMENTUM, solver="spectral"
            ),
            device,
            repeats,
        )
        result["per_iteration"] = result["seconds"] / ITERATIONS
        return result

    record("optmerge_lora.ours", spectral)
    record("optmerge_lora.ours_gram_steps", lambda: _time_gram_steps(lora, "sgd", LORA_LR, MOMENTUM, device))
    record(
        "optmerge_lora.autograd_unpadded",
        lambda: _time_autograd_steps(lora, "sgd", LORA_LR, MOMENTUM, device, budget, throughput),
    )
    record(
        "optmerge_lora.autograd",
        lambda: _time_autograd_steps(padded_projectors(lora), "sgd", LORA_LR, MOMENTUM, device, budget, throughput),
    )
    record(
        "optmerge_exact",
        lambda: _time_once(lambda: closed_form.interference_minimiser(lora), device, repeats),
    )
    del lora

    # OptMerge full.
    problem_seconds, full = timed(lambda: optmerge_problem(vectors, variant="full", rank_fraction=fraction), device)
    out["optmerge_full.problem"] = {"seconds": problem_seconds, "extrapolated": False}
    record("optmerge_full.ours", lambda: _time_gram_steps(full, "adam", FULL_LR, 0.0, device))
    record(
        "optmerge_full.autograd",
        lambda: _time_autograd_steps(padded_projectors(full), "adam", FULL_LR, 0.0, device, budget, throughput),
    )
    del full

    # Closed forms on WUDI's objective: one eigendecomposition of size min(n, N·m).
    size = min(n, experts * m)
    for name, function in (
        ("swudi", lambda: closed_form.swudi(vectors)),
        ("aswudi", lambda: closed_form.aswudi(vectors)),
        ("wudi_exact", lambda: closed_form.wudi_exact(vectors)),
    ):
        if device.type == "cpu" and size > CPU_EIGH_LIMIT:
            out[name] = {"skipped": f"eigendecomposition of {size}×{size} on CPU (limit {CPU_EIGH_LIMIT})"}
            continue
        record(name, lambda function=function: _time_once(function, device, repeats))
    del vectors, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(
    device: torch.device,
    *,
    quick: bool = False,
    plan: Optional[Sequence[Tuple[str, Tuple[int, int], int]]] = None,
    budget: Optional[float] = None,
    save_as: Optional[str] = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Measure the plan and save ``results/kernels_<device>.json`` after every entry.

    ``resume``: keep the entries of an earlier run saved under the same name
    and measure only the missing (shape, N).
    """
    torch.manual_seed(0)
    plan = list(plan or default_plan(device, quick))
    budget = budget if budget is not None else (900.0 if device.type == "cpu" else 300.0)
    throughput = matmul_throughput(device)
    data: Dict[str, Any] = {
        "section": "kernels",
        "environment": environment(device),
        "matmul_macs_per_second": throughput,
        "iterations": ITERATIONS,
        "quick": quick,
        "entries": [],
    }
    name = save_as or f"kernels_{device.type}{'_quick' if quick else ''}"
    previous = RESULTS_DIR / f"{name}.json"
    if resume and previous.exists():
        # Keep what an earlier (interrupted) run of the same section measured.
        data["entries"] = load_json(previous)["entries"]
        data.setdefault("resumed_from", str(previous))
    done = {(tuple(e["shape"]), e["experts"]) for e in data["entries"]}
    _warm_up(device)
    for label, shape, experts in plan:
        if (tuple(shape), experts) in done:
            continue
        entry = {"label": label, "shape": list(shape), "experts": experts, "load_average_before": os.getloadavg(),
                 # entries of resumed runs come from several processes: say which one measured this one
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch_threads": torch.get_num_threads()}
        entry["results"] = measure(shape, experts, device, throughput=throughput, budget=budget, log=log)
        entry["load_average_after"] = os.getloadavg()
        data["entries"].append(entry)
        save_json(name, data)
    return data


def _warm_up(device: torch.device) -> None:
    """First calls pay for imports and validation set-up; keep them out of the timings."""
    base = torch.zeros(8, 4, device=device)
    for method, parameters in (("task_arithmetic", {"weight": 1.0}), ("weight_average", {}), ("ties_merging", {}),
                               ("dare_task_arithmetic", {})):
        merge_tensors([base, base + 1, base - 1], method, base_index=0, name="w", parameters=parameters)


def _seconds(entry: Dict[str, Any], key: str) -> Optional[float]:
    value = entry["results"].get(key, {})
    return value.get("seconds")


def whole_model_estimate(data: Dict[str, Any], experts: int = 5) -> Dict[str, Any]:
    """Qwen2-VL-7B (28 layers × 7 matrices) from the per-matrix times at N experts."""
    per_method: Dict[str, float] = {}
    missing: List[str] = []
    for method in ("optmerge_lora.ours", "optmerge_lora.problem", "optmerge_lora.autograd", "task_arithmetic"):
        total = 0.0
        for label, count in MATRICES_PER_LAYER.items():
            entry = next(
                (e for e in data["entries"] if tuple(e["shape"]) == SHAPES[label] and e["experts"] == experts), None
            )
            seconds = _seconds(entry, method) if entry else None
            if seconds is None:
                missing.append(f"{method} {label}")
                total = math.nan
                break
            total += count * seconds
        per_method[method] = LAYERS * total
    return {"experts": experts, "seconds": per_method, "missing": missing}


def matrices(plan: Iterable[Tuple[str, Tuple[int, int], int]]) -> List[Tuple[int, int]]:
    return sorted({shape for _, shape, _ in plan})
