"""Whole merges with stock ``mergekit-yaml``: wall time and peak RSS per method.

A synthetic multi-layer Qwen2 checkpoint (a base and N experts, bfloat16 like
real MLLM checkpoints) is merged once per method, each in its own
``mergekit-yaml`` subprocess with the same options; its peak memory is read by a
minimal launcher process whose only child it is (see :func:`run_child`): the
total RSS high-water mark (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and the
anonymous RSS (the target applies to it; the total also counts the clean pages
of the memory-mapped input files, which mergekit keeps mapped).

The memory target is ``peak RSS ≤ (N + 3) × largest tensor + 1 GiB``:
mergekit streams tensor by tensor, so a merge should hold the N + 1 inputs of
one tensor plus a couple of working copies, never whole models. mergekit's
writer buffers up to ``--out-shard-size`` (default 5B) of output before writing
a shard, so merges also run with a small shard size to separate the writer's
share from the method's.

Two checkpoints: ``streaming`` (24 layers, largest tensor the 32000×1024
embedding) for task arithmetic, the element-wise methods and OptMerge; and
``matrix`` (4 smaller layers) for the optimisation and SVD methods, whose
300-step CPU runs would take hours on the larger one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.common import GIB, environment, log_progress, save_json
from mergekit_mllm.testing import perturb_checkpoint, recipe_for, save_tokenizer, write_recipe

EXPERTS = 5


@dataclass(frozen=True)
class SyntheticCheckpoint:
    name: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    dtype: str = "bfloat16"

    def config(self):
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            torch_dtype=self.dtype,
            architectures=["Qwen2ForCausalLM"],
        )


STREAMING = SyntheticCheckpoint("streaming", hidden=1024, intermediate=2816, layers=24, vocab=32000, heads=16, kv_heads=4)
MATRIX = SyntheticCheckpoint("matrix", hidden=512, intermediate=1408, layers=4, vocab=8000, heads=8, kv_heads=2)
#: two decoder layers with Qwen2-VL-7B's LM shapes (MLP 18944×3584, q/o 3584², k/v 512×3584), small vocab:
#: where the element-wise kernels' time goes in a real 7B merge
QWEN7B_LAYERS = SyntheticCheckpoint("qwen2vl7b_layers", hidden=3584, intermediate=18944, layers=2, vocab=8000,
                                    heads=28, kv_heads=4)
QUICK = SyntheticCheckpoint("quick", hidden=64, intermediate=176, layers=2, vocab=1000, heads=4, kv_heads=2)

ELEMENTWISE = ("weight_average", "ties_merging", "dare_task_arithmetic", "dare_ties_merging")
SMALL_SHARDS = "100M"


@dataclass(frozen=True)
class MergeRun:
    method: str
    checkpoint: SyntheticCheckpoint
    parameters: Optional[Dict[str, Any]] = None
    out_shard_size: Optional[str] = None

    @property
    def label(self) -> str:
        label = self.method
        if self.parameters and "variant" in self.parameters:
            label += f" ({self.parameters['variant']})"
        if self.out_shard_size:
            label += f" [shards {self.out_shard_size}]"
        return label


def wide_runs() -> List[MergeRun]:
    """Element-wise methods against task_arithmetic (first and last) on :data:`QWEN7B_LAYERS`."""
    ta = {"weight": 1.0}
    return ([MergeRun("task_arithmetic", QWEN7B_LAYERS, ta)] + [MergeRun(m, QWEN7B_LAYERS) for m in ELEMENTWISE]
            + [MergeRun("task_arithmetic", QWEN7B_LAYERS, ta)])


def default_runs(quick: bool = False) -> List[MergeRun]:
    streaming, matrix = (QUICK, QUICK) if quick else (STREAMING, MATRIX)
    ta = {"weight": 1.0}
    runs = [MergeRun("task_arithmetic", streaming, ta)]
    runs += [MergeRun(method, streaming) for method in ELEMENTWISE]
    runs += [MergeRun("optmerge", streaming, {"variant": "lora"}), MergeRun("aswudi", streaming)]
    runs += [
        MergeRun("task_arithmetic", streaming, ta, SMALL_SHARDS),
        MergeRun("weight_average", streaming, None, SMALL_SHARDS),
        MergeRun("ties_merging", streaming, None, SMALL_SHARDS),
        MergeRun("optmerge", streaming, {"variant": "lora"}, SMALL_SHARDS),
    ]
    runs.append(MergeRun("task_arithmetic", streaming, ta))  # again: drift of the shared machine
    runs += [MergeRun("task_arithmetic", matrix, ta)]
    runs += [
        MergeRun(method, matrix, parameters)
        for method, parameters in (
            ("weight_average", None),
            ("tsv", None),
            ("iso_c", None),
            ("wudi", None),
            ("optmerge", {"variant": "lora"}),
            ("optmerge", {"variant": "full"}),
            ("wudi_exact", None),
            ("optmerge_exact", {"variant": "lora"}),
            ("swudi", None),
            ("aswudi", None),
        )
    ]
    return runs


# --------------------------------------------------------------------------
# Synthetic checkpoints.


def build_checkpoint(spec: SyntheticCheckpoint, directory: Path, seed: int = 0) -> Path:
    """A ``save_pretrained``-style directory with seeded random weights."""
    from transformers import Qwen2ForCausalLM

    if (directory / "model.safetensors").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = spec.config()
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Qwen2ForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (0.02 * torch.randn(shape, generator=generator)).to(dtype)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def build_family(spec: SyntheticCheckpoint, root: Path, experts: int = EXPERTS) -> Dict[str, Any]:
    """Base plus experts with LoRA-like rank-16 changes to every matrix."""
    base = build_checkpoint(spec, root / spec.name / "base")
    expert_paths = []
    for index in range(experts):
        target = root / spec.name / f"expert{index}"
        if not (target / "model.safetensors").exists():
            perturb_checkpoint(base, target, seed=100 + index, scale=0.002, low_rank=16)
        expert_paths.append(target)
    return {"base": base, "experts": expert_paths}


def largest_tensor_bytes(directory: Path) -> Tuple[str, int]:
    largest = ("", 0)
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                numel = 1
                for size in piece.get_shape():
                    numel *= size
                nbytes = numel * _dtype_bytes(piece.get_dtype())
                if nbytes > largest[1]:
                    largest = (name, nbytes)
    return largest


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}[name]


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


# --------------------------------------------------------------------------
# Running mergekit-yaml.


def mergekit_yaml() -> str:
    candidate = Path(sys.executable).with_name("mergekit-yaml")
    return str(candidate) if candidate.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")


# A lean launcher (no site, no torch) runs the command and reports its memory:
# * ``peak_rss_bytes``: getrusage(RUSAGE_CHILDREN).ru_maxrss read in the
#   launcher, whose only child is the command. It counts every resident page,
#   including the clean file-backed pages of the memory-mapped safetensors
#   inputs, which mergekit keeps mapped (the kernel drops them under pressure).
#   Measuring from this benchmark process instead would add its own RSS: a
#   child's high-water mark starts from its parent's at fork.
# * ``peak_anon_bytes``: the largest RssAnon seen by polling /proc every 20 ms,
#   the memory the merge really holds (tensors, buffers, the interpreter).
_LAUNCHER = """
import json, resource, subprocess, sys, time
report, command = sys.argv[1], sys.argv[2:]
child = subprocess.Popen(command)
peak = {"RssAnon": 0, "RssFile": 0}
while child.poll() is None:
    try:
        with open("/proc/%d/status" % child.pid) as status:
            for line in status:
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
    except (OSError, ValueError, IndexError):
        pass
    time.sleep(0.02)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(report, "w") as handle:
    json.dump({"returncode": child.returncode, "maxrss_kib": usage.ru_maxrss, "anon_kib": peak["RssAnon"],
               "file_kib": peak["RssFile"], "user_seconds": usage.ru_utime,
               "system_seconds": usage.ru_stime}, handle)
"""


def run_child(command: Sequence[str], log_path: Path) -> Dict[str, Any]:
    """Run ``command``; its wall time, exit status and peak memory (see above)."""
    report = Path(str(log_path) + ".rusage.json")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        launcher = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(report), *command], stdout=log, stderr=subprocess.STDOUT
        )
        seconds = time.perf_counter() - start
    if launcher.returncode != 0 or not report.exists():
        return {"seconds": seconds, "returncode": launcher.returncode or -1, "peak_rss_bytes": 0, "peak_anon_bytes": 0}
    usage = json.loads(report.read_text())
    return {
        "seconds": seconds,
        "returncode": usage["returncode"],
        "peak_rss_bytes": usage["maxrss_kib"] * 1024,  # Linux reports KiB
        "peak_anon_bytes": usage["anon_kib"] * 1024,
        "peak_file_bytes": usage["file_kib"] * 1024,
        "user_seconds": usage["user_seconds"],
        "system_seconds": usage["system_seconds"],
    }


def interpreter_rss(log_dir: Path) -> Dict[str, Any]:
    """Peak RSS of a Python that only imports torch and mergekit (the fixed cost)."""
    return run_child([sys.executable, "-c", "import torch, mergekit.merge, mergekit.merge_methods"], log_dir / "imports.log")


def inductor_cache_entries() -> int:
    """Files in inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR`` or its default): a merge
    process that compiled a kernel adds some, one that loaded them all adds none."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return sum(len(files) for _, _, files in os.walk(cache_dir()))


def merge_once(run: MergeRun, family: Dict[str, Any], workdir: Path, device: torch.device) -> Dict[str, Any]:
    slug = run.label.replace(" ", "_").replace("(", "").replace(")", "").replace("[", "").replace("]", "")
    recipe = recipe_for(run.method, family["base"], family["experts"], run.parameters, dtype=run.checkpoint.dtype)
    recipe_path = write_recipe(workdir / f"{run.checkpoint.name}_{slug}.yml", recipe)
    out = workdir / f"out_{run.checkpoint.name}_{slug}"
    shutil.rmtree(out, ignore_errors=True)
    command = [mergekit_yaml(), str(recipe_path), str(out)]
    if device.type == "cuda":
        command.append("--cuda")
    if run.out_shard_size:
        command += ["--out-shard-size", run.out_shard_size]
    cached = inductor_cache_entries()
    result = run_child(command, workdir / f"{run.checkpoint.name}_{slug}.log")
    # a compile inside a timed run inflates its time by seconds and its RSS by ≈0.8 GiB
    result["compiled"] = inductor_cache_entries() > cached
    result["command"] = " ".join(command[1:])
    result["output_bytes"] = checkpoint_bytes(out) if out.exists() else 0
    if result["returncode"] != 0:
        result["error_tail"] = (workdir / f"{run.checkpoint.name}_{slug}.log").read_text()[-2000:]
    shutil.rmtree(out, ignore_errors=True)
    return result


def warm_up(runs: Sequence[MergeRun], families: Dict[str, Dict[str, Any]], workdir: Path, device: torch.device,
            log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """One untimed merge per element-wise method and checkpoint before the timed ones: the fused
    kernels compile on a machine's first use of each variant (≈13 s for TIES's; inductor caches
    them on disk), and a timed run must pay only what every later merge pays (loading them)."""
    done = []
    if device.type != "cpu":
        return done
    seen = set()
    for merge_run in runs:
        key = (merge_run.method, merge_run.checkpoint.name)
        if merge_run.method not in ELEMENTWISE or key in seen:
            continue
        seen.add(key)
        with log_progress(f"warm-up (untimed) {merge_run.checkpoint.name}: {merge_run.method}", log):
            result = merge_once(merge_run, families[merge_run.checkpoint.name], workdir, device)
        done.append({"method": merge_run.method, "checkpoint": merge_run.checkpoint.name,
                     "seconds": result["seconds"], "returncode": result["returncode"]})
    return done


def run(
    device: torch.device,
    *,
    quick: bool = False,
    workdir: Optional[Path] = None,
    runs: Optional[Sequence[MergeRun]] = None,
    save_as: Optional[str] = None,
    log: Callable[[str], None] = print,
    repeat: int = 1,
) -> Dict[str, Any]:
    """Every run of ``runs`` once per round, ``repeat`` rounds (interleaved, so that a slow spell
    of a shared machine does not fall on one method's repeats only)."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    runs = list(runs or default_runs(quick))
    owned = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mergekit_mllm_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    name = save_as or f"merge_{device.type}{'_quick' if quick else ''}"
    data: Dict[str, Any] = {"section": "merge", "environment": environment(device), "experts": EXPERTS, "quick": quick,
                            "repeat": repeat}
    try:
        families: Dict[str, Dict[str, Any]] = {}
        checkpoints = {}
        for spec in {r.checkpoint.name: r.checkpoint for r in runs}.values():
            with log_progress(f"build checkpoint {spec.name}", log):
                families[spec.name] = build_family(spec, workdir)
            tensor_name, nbytes = largest_tensor_bytes(families[spec.name]["base"])
            checkpoints[spec.name] = {
                "spec": asdict(spec),
                "model_bytes": checkpoint_bytes(families[spec.name]["base"]),
                "largest_tensor": tensor_name,
                "largest_tensor_bytes": nbytes,
                "rss_bound_bytes": (EXPERTS + 3) * nbytes + GIB,
            }
        data["checkpoints"] = checkpoints
        data["interpreter"] = interpreter_rss(workdir)
        data["warm_up"] = warm_up(runs, families, workdir, device, log)
        data["runs"] = []
        for round_index in range(repeat):
            for merge_run in runs:
                label = f"merge {merge_run.checkpoint.name}: {merge_run.label}"
                with log_progress(label if repeat == 1 else f"{label} (round {round_index + 1}/{repeat})", log):
                    result = merge_once(merge_run, families[merge_run.checkpoint.name], workdir, device)
                if result["compiled"]:  # not what a merge costs once the kernels are cached: measure again
                    log("    it compiled a kernel (inductor's cache grew); measuring again")
                    discarded = result
                    result = merge_once(merge_run, families[merge_run.checkpoint.name], workdir, device)
                    result["discarded_compiling_run"] = {key: discarded[key] for key in ("seconds", "peak_anon_bytes")}
                result.update(
                    {
                        "method": merge_run.method,
                        "label": merge_run.label,
                        "checkpoint": merge_run.checkpoint.name,
                        "out_shard_size": merge_run.out_shard_size,
                        "load_average": os.getloadavg(),
                        "round": round_index,
                    }
                )
                bound = checkpoints[merge_run.checkpoint.name]["rss_bound_bytes"]
                result["within_rss_bound"] = result["peak_anon_bytes"] <= bound
                log(
                    f"    {result['seconds']:.1f}s, peak anonymous RSS {result['peak_anon_bytes'] / GIB:.2f} GiB "
                    f"(bound {bound / GIB:.2f} GiB), peak total RSS {result['peak_rss_bytes'] / GIB:.2f} GiB, "
                    f"exit {result['returncode']}"
                )
                data["runs"].append(result)
                save_json(name, data)
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    return data
