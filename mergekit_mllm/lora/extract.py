"""A merged model as a peft LoRA adapter over its base (the ``lora_output`` option).

Per weight of an adaptable module (nn.Linear, GPT-2's Conv1D, nn.Embedding)
the merged delta Δ = merged − base is replaced by its best rank-k
approximation (truncated SVD, Eckart–Young), k = min(rank, m, n), stored as
B = U_k√Σ_k and A = √Σ_k V_kᵀ with scaling 1. The share of ‖Δ‖² kept,
Σ_{i≤k} σᵢ² / Σ σᵢ², is reported per tensor and overall.

Other changed tensors cannot be low-rank factors: biases of adapted modules
are saved whole (peft's ``bias: lora_only``), the modules of the rest
(norms, …) go to ``modules_to_save`` — or, with ``modules_to_save: false``,
are left out and reported as dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_mllm.lora.adapter import PEFT_PREFIX
from mergekit_mllm.lora.names import NameMap, linear_weights

@dataclass
class TensorEnergy:
    name: str  # checkpoint name
    module: str  # in-memory module path
    shape: Tuple[int, ...]
    rank: int
    energy_kept: float
    delta_norm: float

    def as_dict(self) -> dict:
        return {"module": self.module, "shape": list(self.shape), "rank": self.rank,
                "energy_kept": self.energy_kept, "delta_norm": self.delta_norm}


@dataclass
class ExtractionReport:
    path: str
    rank: int
    lora: List[TensorEnergy] = field(default_factory=list)
    exact: Dict[str, float] = field(default_factory=dict)  # saved whole: name -> ‖Δ‖
    dropped: Dict[str, float] = field(default_factory=dict)  # not representable: name -> ‖Δ‖

    def overall_energy(self) -> float:
        """Share of Σ‖Δ‖² over every changed tensor that the adapter reproduces."""
        kept = sum(t.energy_kept * t.delta_norm**2 for t in self.lora) + sum(n**2 for n in self.exact.values())
        total = sum(t.delta_norm**2 for t in self.lora) + sum(n**2 for n in self.exact.values()) \
            + sum(n**2 for n in self.dropped.values())
        return 1.0 if total == 0 else kept / total

    def as_dict(self) -> dict:
        lora_total = sum(t.delta_norm**2 for t in self.lora)
        return {
            "path": self.path,
            "rank": self.rank,
            "energy_kept": self.overall_energy(),
            "lora_energy_kept": 1.0 if lora_total == 0 else
            sum(t.energy_kept * t.delta_norm**2 for t in self.lora) / lora_total,
            "lora_tensors": {t.name: t.as_dict() for t in self.lora},
            "saved_whole": self.exact,
            "dropped": self.dropped,
        }


def low_rank_factors(delta: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, energy kept) with B·A the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    total = float(s.square().sum())
    kept = float(s[:k].square().sum())
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], (1.0 if total == 0 else kept / total)


def extract_adapter(
    merged_dir,
    base_dir,
    out_dir,
    *,
    rank: int,
    modules_to_save: bool = True,
    base_model_name_or_path: Optional[str] = None,
    trust_remote_code: bool = False,
) -> ExtractionReport:
    """Write ``out_dir`` (a peft adapter of rank ``rank`` over ``base_dir``)
    reproducing ``merged_dir`` as closely as rank ``rank`` allows."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora_output rank must be a positive integer; got {rank!r}")
    merged_dir, base_dir, out_dir = Path(merged_dir), Path(base_dir), Path(out_dir)
    base = LazyTensorLoader(ShardedTensorIndex.from_disk(str(base_dir)), lazy_unpickle=False)
    merged = LazyTensorLoader(ShardedTensorIndex.from_disk(str(merged_dir)), lazy_unpickle=False)
    names = NameMap(str(base_dir), base.index.tensor_paths, trust_remote_code)
    adaptable = {}  # checkpoint weight name -> (in-memory module path, kind)
    for weight, (kind, _shape) in linear_weights(str(base_dir), trust_remote_code).items():
        target = names.checkpoint_name(weight)
        if target is not None:
            adaptable[target] = (weight[: -len(".weight")], kind)

    report = ExtractionReport(path=str(out_dir), rank=rank)
    tensors: Dict[str, torch.Tensor] = {}
    targets: Dict[str, int] = {}  # adapted module -> rank
    changed: Dict[str, float] = {}  # other changed tensors -> ‖Δ‖
    for name in sorted(base.index.tensor_paths):
        original = base.get_tensor(name)
        if name not in merged.index.tensor_paths or not original.is_floating_point():
            continue
        compute = torch.float64 if original.dtype == torch.float64 else torch.float32
        merged_tensor = merged.get_tensor(name)
        delta = merged_tensor.to(compute) - original.to(compute)
        norm = float(delta.norm())
        if norm == 0.0:
            continue
        if name not in adaptable:
            changed[name] = norm
            continue
        module, kind = adaptable[name]
        matrix = delta if kind == "linear" else delta.T  # peft stores (B·A)ᵀ for Conv1D and embeddings
        b, a, energy = low_rank_factors(matrix, rank)
        a, b = a.to(merged_tensor.dtype), b.to(merged_tensor.dtype)  # stored like the merged model
        stem = PEFT_PREFIX + module
        if kind == "embedding":
            tensors[stem + ".lora_embedding_A"], tensors[stem + ".lora_embedding_B"] = a, b
        else:
            tensors[stem + ".lora_A.weight"], tensors[stem + ".lora_B.weight"] = a, b
        targets[module] = a.shape[0]
        report.lora.append(TensorEnergy(name, module, tuple(delta.shape), a.shape[0], energy, norm))

    save_modules, biases = set(), False
    for name, norm in changed.items():
        module, _, leaf = names.in_memory_name(name).rpartition(".")
        if leaf == "bias" and module in targets:
            # the bias of an adapted module: saved whole by peft's bias="lora_only"
            tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = merged.get_tensor(name)
            biases = True
            report.exact[name] = norm
        elif modules_to_save and module:
            save_modules.add(module)
            report.exact[name] = norm
        else:
            report.dropped[name] = norm
    # modules_to_save replaces the whole module: every tensor of it is saved
    for name in sorted(base.index.tensor_paths):
        parameter = names.in_memory_name(name)
        if parameter.rpartition(".")[0] in save_modules:
            tensors[PEFT_PREFIX + parameter] = merged.get_tensor(name)
    _write_adapter(out_dir, tensors, rank, targets, sorted(save_modules), biases,
                   base_model_name_or_path or str(base_dir))
    return report


def _write_adapter(out_dir: Path, tensors, rank, targets: Dict[str, int], modules_to_save, biases, base_name) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        # scaling α/r = 1 everywhere: modules of smaller rank get α = r too
        rank_pattern={_exact(m): k for m, k in targets.items() if k != rank},
        alpha_pattern={_exact(m): k for m, k in targets.items() if k != rank},
        target_modules=sorted(targets) or None,
        modules_to_save=modules_to_save or None,
        bias="lora_only" if biases else "none",
        base_model_name_or_path=base_name,
        inference_mode=True,
    )
    config.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def _exact(module: str) -> str:
    """A rank_pattern key for exactly this module (peft matches ``(.*\\.)?key$``)."""
    return re.escape(module)


def energy_summary(report: ExtractionReport) -> str:
    data = report.as_dict()
    return (f"rank {report.rank}: {100 * data['energy_kept']:.2f}% of ‖Δ‖² kept overall "
            f"({100 * data['lora_energy_kept']:.2f}% on {len(report.lora)} LoRA tensors)")
