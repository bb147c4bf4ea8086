"""Timing, memory and environment helpers shared by the benchmark sections."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import torch

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"
GIB = 1024**3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> Tuple[float, Any]:
    """Wall seconds of ``function()``, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def best_of(repeats: int, function: Callable[[], Any], device: torch.device) -> float:
    """The fastest of ``repeats`` runs (the machine may be shared: the minimum
    is the least disturbed measurement)."""
    return min(timed(function, device)[0] for _ in range(repeats))


def current_rss_bytes() -> int:
    """Resident set size of this process now (from /proc; Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def timed_with_peak_memory(function: Callable[[], Any], device: torch.device) -> Tuple[float, int]:
    """Wall seconds of ``function()`` and the most memory it held beyond what was
    resident before: device memory on CUDA; on CPU the RSS high-water mark
    (reset through /proc/self/clear_refs, Linux ≥ 4.0) minus the RSS before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        seconds, result = timed(function, device)
        del result
        return seconds, torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_bytes("VmRSS")
    seconds, result = timed(function, device)
    del result
    return seconds, max(0, _status_bytes("VmHWM") - before)


def peak_rss_bytes_of_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def load_average() -> Tuple[float, float, float]:
    return os.getloadavg()


def environment(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on."""
    info: Dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import mergekit

        info["mergekit"] = getattr(mergekit, "__version__", "0.1.5")
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        info["cpu_model"] = _cpu_model()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def matmul_throughput(device: torch.device, size: int = 2048) -> float:
    """Measured float32 multiply-adds per second of one size³ product."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    seconds = best_of(3, lambda: a @ b, device)
    return size**3 / seconds


def save_json(name: str, data: Dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path


def load_json(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())


@contextmanager
def log_progress(label: str, log: Callable[[str], None] = print) -> Iterator[None]:
    start = time.perf_counter()
    log(f"[{time.strftime('%H:%M:%S')}] {label} …")
    yield
    log(f"[{time.strftime('%H:%M:%S')}] {label} done in {time.perf_counter() - start:.1f}s")
