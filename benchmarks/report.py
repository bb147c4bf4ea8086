"""Render ``benchmarks/RESULTS.md`` and its plots from the saved JSON results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.common import GIB, RESULTS_DIR, ROOT, load_json

PER_ITERATION_PAIRS = (
    # (label, ours, baseline)
    ("WUDI: Gram-form Adam step vs autograd step", "wudi.ours", "wudi.autograd"),
    ("OptMerge lora: Gram-form SGD step vs autograd step (padded, as released)", "optmerge_lora.ours_gram_steps", "optmerge_lora.autograd"),
    ("OptMerge lora: spectral solve ÷ 300 vs autograd step (padded, as released)", "optmerge_lora.ours", "optmerge_lora.autograd"),
    ("OptMerge lora: spectral solve ÷ 300 vs autograd step (unpadded k×n projectors)", "optmerge_lora.ours", "optmerge_lora.autograd_unpadded"),
    ("OptMerge full: Gram-form Adam step vs autograd step (padded, as released)", "optmerge_full.ours", "optmerge_full.autograd"),
)

PER_MATRIX_COLUMNS = (
    ("TA (mergekit)", ["task_arithmetic"]),
    ("WUDI ours", ["wudi.ours"]),
    ("WUDI autograd", ["wudi.autograd"]),
    ("OptMerge-lora ours", ["optmerge_lora.problem", "optmerge_lora.ours"]),
    ("OptMerge-lora autograd", ["optmerge_lora.problem", "optmerge_lora.autograd"]),
    ("OptMerge-full ours", ["optmerge_full.problem", "optmerge_full.ours"]),
    ("OptMerge-full autograd", ["optmerge_full.problem", "optmerge_full.autograd"]),
    ("OptMerge exact", ["optmerge_lora.problem", "optmerge_exact"]),
    ("SWUDI", ["swudi"]),
    ("ASWUDI", ["aswudi"]),
    ("WUDI exact", ["wudi_exact"]),
)


def _load_all(include_quick: bool, results_dir: Path = RESULTS_DIR) -> Dict[str, Dict[str, Any]]:
    results = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        data = load_json(path)
        if data.get("quick") and not include_quick:
            continue
        results[path.stem] = data
    return results


def _value(entry: Dict[str, Any], key: str, field: str = "seconds") -> Optional[float]:
    return entry["results"].get(key, {}).get(field)


def _per_iteration(entry: Dict[str, Any], key: str) -> Optional[float]:
    result = entry["results"].get(key, {})
    if "per_iteration" in result:
        return result["per_iteration"]
    return None


def _sum(entry: Dict[str, Any], keys: List[str]) -> Optional[float]:
    values = [_value(entry, key) for key in keys]
    if any(v is None for v in values):
        return None
    return sum(values)


def _extrapolated(entry: Dict[str, Any], keys: List[str]) -> bool:
    return any(entry["results"].get(key, {}).get("extrapolated") for key in keys)


def _fmt_seconds(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 100:
        return f"{value / 60:.1f} min"
    if value >= 1:
        return f"{value:.1f} s"
    return f"{value * 1000:.0f} ms"


def _fmt_ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}×"


def _shape(entry) -> str:
    return f"{entry['shape'][0]}×{entry['shape'][1]}"


# --------------------------------------------------------------------------
# Kernel section.


def _kernel_headline(data: Dict[str, Any]) -> List[str]:
    from benchmarks.kernels import TARGET

    shape, experts = TARGET
    entry = next((e for e in data["entries"] if tuple(e["shape"]) == shape and e["experts"] == experts), None)
    if entry is None:
        return [f"*The target configuration {shape[0]}×{shape[1]}, N = {experts} has not been measured on this device.*"]
    lines = [
        f"Per-iteration time on one {shape[0]}×{shape[1]} weight with N = {experts} experts "
        "(both sides in the same process, same tensors):",
        "",
        "| comparison | ours / step | autograd / step | speed-up | goal |",
        "|---|---|---|---|---|",
    ]
    for label, ours, baseline in PER_ITERATION_PAIRS:
        ours_step, base_step = _per_iteration(entry, ours), _per_iteration(entry, baseline)
        ratio = base_step / ours_step if ours_step and base_step else None
        goal = "≥ 10×" if ours in ("wudi.ours", "optmerge_lora.ours", "optmerge_full.ours") and "unpadded" not in label else ""
        met = "" if not goal or ratio is None else (" ✅" if ratio >= 10 else " ❌")
        lines.append(f"| {label} | {_fmt_seconds(ours_step)} | {_fmt_seconds(base_step)} | {_fmt_ratio(ratio)}{met} | {goal} |")
    return lines


def _kernel_tables(data: Dict[str, Any]) -> List[str]:
    lines = []
    shapes = []
    for entry in data["entries"]:
        if entry["shape"] not in shapes:
            shapes.append(entry["shape"])
    for shape in shapes:
        entries = sorted((e for e in data["entries"] if e["shape"] == shape), key=lambda e: e["experts"])
        label = entries[0]["label"]
        lines += [
            "",
            f"**{shape[0]}×{shape[1]}** ({label}) — seconds per matrix, 300 steps; "
            "`*` = set-up measured, steps timed over a few iterations and extrapolated; "
            "OptMerge columns include building the problem (the SVDs)",
            "",
            "| N | " + " | ".join(name for name, _ in PER_MATRIX_COLUMNS) + " |",
            "|---" * (len(PER_MATRIX_COLUMNS) + 1) + "|",
        ]
        for entry in entries:
            cells = []
            for _, keys in PER_MATRIX_COLUMNS:
                skipped = next((entry["results"][k]["skipped"] for k in keys if "skipped" in entry["results"].get(k, {})), None)
                if skipped:
                    cells.append("skipped")
                    continue
                total = _sum(entry, keys)
                cells.append(_fmt_seconds(total) + ("*" if total is not None and _extrapolated(entry, keys) else ""))
            lines.append(f"| {entry['experts']} | " + " | ".join(cells) + " |")
        skipped = {
            k: v["skipped"] for e in entries for k, v in e["results"].items() if "skipped" in v
        }
        for key, reason in sorted(skipped.items()):
            lines.append(f"\n`{key}` skipped: {reason}.")
    return lines


def _kernel_speedups(data: Dict[str, Any]) -> List[str]:
    lines = [
        "",
        "Per-iteration speed-up over the autograd formulation (as released), every measured configuration:",
        "",
        "| shape | N | WUDI | OptMerge-lora Gram step | OptMerge-lora spectral (÷300) | OptMerge-full | spectral vs unpadded |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in data["entries"]:
        cells = []
        for _, ours, baseline in PER_ITERATION_PAIRS:
            o, b = _per_iteration(entry, ours), _per_iteration(entry, baseline)
            cells.append(_fmt_ratio(b / o if o and b else None))
        order = [0, 1, 2, 4, 3]
        lines.append(f"| {_shape(entry)} | {entry['experts']} | " + " | ".join(cells[i] for i in order) + " |")
    return lines


def _elementwise_kernel(data: Dict[str, Any]) -> List[str]:
    lines = [
        "",
        "Element-wise methods per matrix through `mergekit.merge_methods.api.merge_tensors` "
        "(the adapter path of a merge) on bfloat16 inputs: time (× mergekit's `task_arithmetic` on the same "
        "inputs) and the peak memory held beyond the N + 1 inputs, in input-tensor units (the RSS target "
        "allows 2):",
        "",
        "| shape | N | task_arithmetic | weight_average | ties_merging | dare_task_arithmetic | dare_ties_merging |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in data["entries"]:
        ta_runs = [v for v in (_value(entry, "task_arithmetic"), _value(entry, "task_arithmetic.again")) if v]
        ta = min(ta_runs) if ta_runs else None
        cells = []
        for method in ("task_arithmetic", "weight_average", "ties_merging", "dare_task_arithmetic", "dare_ties_merging"):
            value = ta if method == "task_arithmetic" else _value(entry, method)
            extra = _value(entry, method, "peak_extra_tensors")
            memory = "" if extra is None else f", +{extra:.1f} tensors"
            ratio = "" if method == "task_arithmetic" else f" ({_fmt_ratio(value / ta if value and ta else None)})"
            cells.append(f"{_fmt_seconds(value)}{ratio}{memory}")
        lines.append(f"| {_shape(entry)} | {entry['experts']} | " + " | ".join(cells) + " |")
    env = next((e.get("elementwise_environment") for e in data["entries"] if e.get("elementwise_environment")), None)
    if env:
        backend = {"aot": "ahead-of-time inductor packages", "jit": "torch.compile"}.get(
            env.get("compile_backend"), "torch.compile or ahead-of-time packages")
        ties = {"native": "; the TIES pass by the one-loop C++ kernel, `mergekit_mllm/ops/native_ties.cpp`",
                "inductor": "; the TIES pass by inductor's kernel too"}.get(env.get("ties_pass"), "")
        lines += ["", f"(element-wise rows re-timed with the streaming kernels, fused ({backend}{ties}) for tensors of "
                  f"≥ {env.get('fused_min_elements', 1 << 22):,} entries (`mergekit_mllm/ops/fused.py`, kernels built): torch threads "
                  f"{env.get('torch_threads')}, load average {', '.join(f'{x:.1f}' for x in env.get('load_average', []))}; "
                  "task_arithmetic is the faster of a run before and after the others)"]
    return lines


def _whole_model(data: Dict[str, Any], device: str) -> List[str]:
    from benchmarks.kernels import LAYERS, whole_model_estimate

    estimate = whole_model_estimate(data)
    seconds = estimate["seconds"]
    lines = [
        "",
        f"Qwen2-VL-7B language model ({LAYERS} layers × q, k, v, o, gate, up, down) with N = 5, "
        f"summed from the per-matrix times above ({device}):",
        "",
    ]
    if estimate["missing"]:
        lines.append(f"*Incomplete: no measurement for {', '.join(sorted(set(estimate['missing'])))}.*")
        return lines
    ours = seconds["optmerge_lora.ours"] + seconds["optmerge_lora.problem"]
    theirs = seconds["optmerge_lora.autograd"] + seconds["optmerge_lora.problem"]
    lines += [
        "| | OptMerge (lora) ours | of which SVDs | OptMerge autograd (extrapolated) | task_arithmetic compute |",
        "|---|---|---|---|---|",
        f"| {device} | {_fmt_seconds(ours)} | {_fmt_seconds(seconds['optmerge_lora.problem'])} | "
        f"{_fmt_seconds(theirs)} | {_fmt_seconds(seconds['task_arithmetic'])} |",
    ]
    return lines


# --------------------------------------------------------------------------
# Whole merges.


def _grouped(runs: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """Runs of the same merge (label and output sharding) together, in first-seen order. Without
    rounds (``--repeat``) each run is its own row, as before: the two task_arithmetic runs before
    and after the others stay two rows."""
    if not any(r.get("round") for r in runs):
        return [[r] for r in runs]
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["label"], run.get("out_shard_size")), []).append(run)
    return list(groups.values())


def _merge_section(data: Dict[str, Any]) -> List[str]:
    lines = []
    for name, checkpoint in data["checkpoints"].items():
        spec = checkpoint["spec"]
        runs = [r for r in data["runs"] if r["checkpoint"] == name]
        if not runs:
            continue
        ta_times = [r["seconds"] for r in runs if r["method"] == "task_arithmetic" and not r["out_shard_size"] and r["returncode"] == 0]
        ta = min(ta_times) if ta_times else None
        rounds = any(r.get("round") for r in runs)
        lines += [
            "",
            f"**{name}** checkpoint: Qwen2, {spec['layers']} layers, hidden {spec['hidden']}, MLP {spec['intermediate']}, "
            f"vocab {spec['vocab']}, {spec['dtype']}; {checkpoint['model_bytes'] / GIB:.2f} GiB per model, "
            f"base + {data['experts']} experts; largest tensor `{checkpoint['largest_tensor']}` "
            f"{checkpoint['largest_tensor_bytes'] / 2**20:.1f} MiB; RSS bound (N + 3) × largest + 1 GiB = "
            f"{checkpoint['rss_bound_bytes'] / GIB:.2f} GiB. Time ratios are against the fastest "
            f"task_arithmetic run on it ({_fmt_seconds(ta)}; all task_arithmetic runs: "
            f"{', '.join(_fmt_seconds(t) for t in ta_times)}).",
            "",
            "| method | wall time | × task_arithmetic | peak anonymous RSS | within bound | peak total RSS (incl. mapped inputs) | exit |",
            "|---|---|---|---|---|---|---|",
        ]
        if rounds:
            lines[-4] += (f" Every run was measured in {data.get('repeat', 1)} interleaved rounds; a row gives its "
                          "fastest time and its largest peak RSS over them (every time in the last column).")
            lines[-2] += " all times |"
            lines[-1] += "---|"
        for group in _grouped(runs):
            fastest = min(group, key=lambda r: r["seconds"] if r["returncode"] == 0 else float("inf"))
            ratio = fastest["seconds"] / ta if ta else None
            row = (
                f"| {fastest['label']} | {_fmt_seconds(fastest['seconds'])} | {_fmt_ratio(ratio)} | "
                f"{max(r.get('peak_anon_bytes', 0) for r in group) / GIB:.2f} GiB | "
                f"{'yes' if all(r['within_rss_bound'] for r in group) else '**no**'} | "
                f"{max(r['peak_rss_bytes'] for r in group) / GIB:.2f} GiB | "
                f"{max(group, key=lambda r: abs(r['returncode']))['returncode']} |"
            )
            if rounds:
                row += " " + ", ".join(_fmt_seconds(r["seconds"]) for r in group) + " |"
            lines.append(row)
    interpreter = data.get("interpreter")
    if interpreter:
        lines.append(
            f"\nFixed cost: a Python that only imports torch and mergekit peaks at "
            f"{interpreter.get('peak_anon_bytes', 0) / GIB:.2f} GiB anonymous / {interpreter['peak_rss_bytes'] / GIB:.2f} GiB total RSS."
        )
    return lines


# --------------------------------------------------------------------------
# Plots.


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    return plt


def _plot_kernels(data: Dict[str, Any], device: str, directory: Path) -> Optional[str]:
    plt = _pyplot()
    if plt is None:
        return None
    shapes = []
    for entry in data["entries"]:
        if entry["shape"] not in shapes:
            shapes.append(entry["shape"])
    figure, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False)
    series = (
        ("WUDI ours", "wudi.ours", "tab:blue", "-"),
        ("WUDI autograd", "wudi.autograd", "tab:blue", ":"),
        ("OptMerge-lora spectral ÷300", "optmerge_lora.ours", "tab:green", "-"),
        ("OptMerge-lora autograd", "optmerge_lora.autograd", "tab:green", ":"),
        ("OptMerge-full ours", "optmerge_full.ours", "tab:orange", "-"),
        ("OptMerge-full autograd", "optmerge_full.autograd", "tab:orange", ":"),
    )
    for axis, shape in zip(axes[0], shapes):
        entries = sorted((e for e in data["entries"] if e["shape"] == shape), key=lambda e: e["experts"])
        for label, key, color, style in series:
            points = [(e["experts"], _per_iteration(e, key)) for e in entries if _per_iteration(e, key)]
            if points:
                axis.plot(*zip(*points), style, marker="o", color=color, label=label)
        axis.set_yscale("log")
        axis.set_title(f"{shape[0]}×{shape[1]}")
        axis.set_xlabel("experts N")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("seconds per iteration")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(f"Per-iteration time, ours (solid) vs autograd (dotted), {device}")
    return _save(plt, figure, directory, f"kernels_{device}.png")


def _plot_merge(data: Dict[str, Any], device: str, directory: Path) -> Optional[str]:
    plt = _pyplot()
    if plt is None:
        return None
    checkpoints = [name for name in data["checkpoints"] if any(r["checkpoint"] == name for r in data["runs"])]
    figure, axes = plt.subplots(2, len(checkpoints), figsize=(6.5 * len(checkpoints), 7), squeeze=False)
    for column, name in enumerate(checkpoints):
        runs = [r for r in data["runs"] if r["checkpoint"] == name]
        labels = [r["label"] for r in runs]
        axes[0][column].barh(labels, [r["seconds"] for r in runs], color="tab:blue")
        axes[0][column].set_xlabel("wall seconds")
        axes[0][column].set_title(f"{name} checkpoint")
        axes[1][column].barh(labels, [r["peak_rss_bytes"] / GIB for r in runs], color="tab:gray", label="total (incl. mapped inputs)")
        axes[1][column].barh(labels, [r.get("peak_anon_bytes", 0) / GIB for r in runs], color="tab:purple", label="anonymous")
        bound = data["checkpoints"][name]["rss_bound_bytes"] / GIB
        axes[1][column].axvline(bound, color="red", linestyle="--", label="(N+3)×largest + 1 GiB")
        axes[1][column].set_xlabel("peak RSS (GiB)")
        axes[1][column].legend(fontsize=7)
        for axis in axes[:, column]:
            axis.tick_params(axis="y", labelsize=7)
            axis.invert_yaxis()
    figure.suptitle(f"Whole merges with stock mergekit-yaml ({device})")
    return _save(plt, figure, directory, f"merge_{device}.png")


def _save(plt, figure, directory: Path, name: str) -> str:
    figure.tight_layout()
    figure.savefig(directory / name, dpi=110)
    plt.close(figure)
    return name


# --------------------------------------------------------------------------


def _environment(data: Dict[str, Any]) -> str:
    env = data["environment"]
    what = env.get("gpu") or env.get("cpu_model", "?")
    return (
        f"{env['device']} ({what}), {env.get('cpu_count')} CPU cores, torch {env['torch']} with "
        f"{env['torch_threads']} threads, started {env['started']}, load average at start "
        f"{', '.join(f'{x:.1f}' for x in env['load_average_at_start'])}"
    )


def write(output: Optional[Path] = None, include_quick: bool = False, results_dir: Path = RESULTS_DIR) -> Path:
    output = Path(output or ROOT / "RESULTS.md")
    results = _load_all(include_quick, results_dir)
    lines = [
        "# Benchmarks (issue 8)",
        "",
        "Produced by `python -m benchmarks all` (or its sections `kernels`, `merge`, `scores`, then `report`); "
        "raw numbers in `benchmarks/results/*.json`. Every ratio compares two measurements taken in the same "
        "process on the same tensors. See the notes at the end for what is extrapolated and what was not measured.",
    ]
    kernel_runs = {k: v for k, v in results.items() if v.get("section") == "kernels"}
    merge_runs = {k: v for k, v in results.items() if v.get("section") == "merge"}
    score_runs = {k: v for k, v in results.items() if v.get("section") == "scores"}
    devices_measured = {v["environment"]["device"].split(":")[0] for v in results.values() if "environment" in v}
    if "cuda" not in devices_measured:
        lines += ["", "**No GPU was lent for these runs: CUDA timings and the H100 whole-model time are not measured.**"]

    for name, data in kernel_runs.items():
        device = data["environment"]["device"]
        lines += ["", f"## Kernels per matrix — {device}", "", _environment(data) + ".", ""]
        lines += _kernel_headline(data)
        lines += _kernel_speedups(data)
        lines += ["", "### Time per matrix (300 steps)"]
        lines += _kernel_tables(data)
        lines += _elementwise_kernel(data)
        lines += _whole_model(data, device)
        plot = _plot_kernels(data, name.split("_", 1)[1], output.parent)
        if plot:
            lines += ["", f"![per-iteration time]({plot})"]

    for name, data in merge_runs.items():
        device = data["environment"]["device"]
        lines += ["", f"## Whole merges with stock `mergekit-yaml` — {device}", "", _environment(data) + "."]
        lines += _merge_section(data)
        plot = _plot_merge(data, name.split("_", 1)[1], output.parent)
        if plot:
            lines += ["", f"![whole merges]({plot})"]

    lines += ["", "## Merged-model scores"]
    closed_forms = {k: v for k, v in results.items() if v.get("section") == "closed_form_scores"}
    for data in closed_forms.values():
        from benchmarks.closed_form_scores import render as render_closed_forms

        lines += render_closed_forms(data)
        lines += ["", "Seed-to-seed spreads and the method comparisons of the benchmark itself: "
                  "`eval_suite/SYNTH_RESULTS.md`; what these rows show: the notes at the end."]
    if score_runs:
        from benchmarks.scores import render

        for data in score_runs.values():
            lines += render(data)
    elif not closed_forms:
        lines += ["", "*Not run:* see `python -m benchmarks scores` (needs `eval_suite`)."]

    notes = ROOT / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    output.write_text("\n".join(lines) + "\n")
    return output
