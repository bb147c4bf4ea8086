"""Reading a peft LoRA adapter directory as per-weight task vectors.

A saved adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
holds, per adapted module, the factors A (r×n) and B (m×r); peft's merge adds
``scaling·B·A`` to the module's weight with ``scaling = α/r`` (``α/√r`` for
rsLoRA), r and α possibly overridden per module by ``rank_pattern`` /
``alpha_pattern``. Modules listed in ``modules_to_save`` (and biases trained
with ``bias: all|lora_only``) are saved whole and replace the base tensor.

Names here are the module paths of the model peft wrapped (transformers'
in-memory names, e.g. ``model.language_model.layers.0.self_attn.q_proj``);
:mod:`mergekit_mllm.lora.names` maps them to checkpoint tensor names.

Adapters whose effect is not ``W + scaling·B·A`` are refused with a message
naming the feature (DoRA, activated LoRA, trainable tokens, LoRA on
convolutions or on raw parameters, layer replication, and PiSSA/OLoRA/CorDA/
LoftQ adapters that were saved relative to a modified base).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import torch

from mergekit_mllm.ops.lowrank import LowRank

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHT_NAMES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
PEFT_PREFIX = "base_model.model."

# Initialisations that move the base weights: unless peft converted the adapter
# on save (which rewrites init_lora_weights to true), its factors are relative
# to a base that no longer exists.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal")
_LORA_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(\.[^.]+)?\.(?P<param>weight|bias)$")
_LORA_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)(\.[^.]+)?$")
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")

Layout = Literal["linear", "transposed", "embedding"]


class AdapterError(ValueError):
    """An adapter this plugin cannot read exactly; the message says why."""


def is_adapter_dir(path) -> bool:
    """A local peft adapter directory (an adapter config and no full model weights)."""
    directory = Path(str(path))
    return (directory / ADAPTER_CONFIG_NAME).is_file() and not any(
        (directory / name).exists() for name in MODEL_WEIGHT_NAMES
    )


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scaling·B·A, laid out as the module's weight."""

    name: str  # module path, in-memory names
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    layout: Layout
    bias_key: Optional[str] = None  # lora_B.bias (lora_bias=True): Δbias = scaling·b

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


def _pattern_value(patterns: Dict[str, float], module: str, default):
    """peft's rank_pattern/alpha_pattern lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class _Weights:
    """Lazy access to the adapter's tensors (safetensors) or all at once (.bin)."""

    def __init__(self, directory: Path):
        self.file = next((directory / n for n in ADAPTER_WEIGHT_NAMES if (directory / n).is_file()), None)
        if self.file is None:
            raise AdapterError(f"peft adapter {directory} has no {' or '.join(ADAPTER_WEIGHT_NAMES)}")
        self._loaded: Optional[Dict[str, torch.Tensor]] = None
        if self.file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(self.file), framework="pt") as handle:
                self.keys = list(handle.keys())
                self.shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in self.keys}
        else:
            self._loaded = torch.load(self.file, map_location="cpu", weights_only=True)
            self.keys = list(self._loaded)
            self.shapes = {key: tuple(t.shape) for key, t in self._loaded.items()}

    def get(self, key: str) -> torch.Tensor:
        if self._loaded is not None:
            return self._loaded[key]
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as handle:
            return handle.get_tensor(key)


class LoraAdapter:
    """A peft LoRA adapter directory, parsed and validated (tensors read lazily)."""

    def __init__(self, path):
        self.path = Path(str(path))
        config_file = self.path / ADAPTER_CONFIG_NAME
        if not config_file.is_file():
            raise AdapterError(f"{self.path} is not a peft adapter directory (no {ADAPTER_CONFIG_NAME})")
        self.config = json.loads(config_file.read_text())
        self._check_supported()
        self.weights = _Weights(self.path)
        # lora modules by module path; whole tensors by parameter name
        self.modules: Dict[str, LoraModule] = {}
        self.saved_tensors: Dict[str, str] = {}
        self._parse()

    # ------------------------------------------------------------ config

    @property
    def base_model_name_or_path(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def _refuse(self, feature: str, why: str) -> None:
        raise AdapterError(f"peft adapter {self.path} uses {feature}, which {why}; it cannot be merged as LoRA factors")

    def _check_supported(self) -> None:
        config = self.config
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{self.path} is a {peft_type} adapter; only LoRA adapters are supported")
        if config.get("use_dora"):
            self._refuse("DoRA (use_dora)", "rescales every column by a learned magnitude (not W + B·A)")
        if config.get("alora_invocation_tokens"):
            self._refuse("activated LoRA", "applies only after its invocation tokens (no static weight)")
        if config.get("trainable_token_indices"):
            self._refuse("trainable_token_indices", "is not supported here")
        if config.get("target_parameters"):
            self._refuse("target_parameters", "adapts raw parameters, not modules")
        if config.get("layer_replication"):
            self._refuse("layer_replication", "changes the layer structure")
        for flag in ("use_qalora", "use_bdlora"):
            if config.get(flag):
                self._refuse(flag, "is not a plain low-rank update")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
            self._refuse(
                f"init_lora_weights={init!r}",
                "moves the base weights at initialisation (save it with path_initial_model_for_weight_conversion)",
            )

    def scaling_for(self, module: str) -> Tuple[int, float, float]:
        """(r, α, scaling) of one module, as peft's LoraModel computes them."""
        rank = int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8)))
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)))
        return rank, alpha, (alpha / math.sqrt(rank) if self.use_rslora else alpha / rank)

    # ------------------------------------------------------------ tensors

    def _parse(self) -> None:
        factors: Dict[str, Dict[str, str]] = {}
        layouts: Dict[str, Layout] = {}
        transposed = bool(self.config.get("fan_in_fan_out", False))
        for key in self.weights.keys:
            if "lora_magnitude_vector" in key:
                self._refuse("DoRA magnitude vectors", "rescale the weight")
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            name = _SAVED_COPY.sub("", name)
            if match := _LORA_FACTOR.match(name):
                module, which, param = match["module"], match["which"], match["param"]
                factors.setdefault(module, {})[which + ("_bias" if param == "bias" else "")] = key
                layouts[module] = "transposed" if transposed else "linear"
            elif match := _LORA_EMBEDDING.match(name):
                factors.setdefault(match["module"], {})[match["which"]] = key
                layouts[match["module"]] = "embedding"
            else:
                self.saved_tensors[name.replace(".base_layer.", ".")] = key
        for module, keys in sorted(factors.items()):
            if "A" not in keys or "B" not in keys:
                raise AdapterError(f"peft adapter {self.path}: module {module} has only one of lora_A/lora_B")
            a_shape, b_shape = self.weights.shapes[keys["A"]], self.weights.shapes[keys["B"]]
            if len(a_shape) != 2 or len(b_shape) != 2:
                self._refuse(f"LoRA on {module} (factor shapes {a_shape}, {b_shape})", "is a convolution")
            rank, alpha, scaling = self.scaling_for(module)
            stored_rank = a_shape[0]
            if stored_rank != rank or b_shape[1] != rank:
                raise AdapterError(
                    f"peft adapter {self.path}: module {module} has factors of rank {stored_rank}/{b_shape[1]} but "
                    f"adapter_config.json gives r={rank} (r / rank_pattern); the scaling would be wrong"
                )
            self.modules[module] = LoraModule(
                module, keys["A"], keys["B"], rank, alpha, scaling, layouts[module], keys.get("B_bias")
            )

    def factors(self, module: str) -> LowRank:
        """ΔW of ``module`` as LowRank(left, right), scaling folded into the left factor."""
        spec = self.modules[module]
        a, b = self.weights.get(spec.a_key), self.weights.get(spec.b_key)
        if spec.layout == "linear":  # W is out×in: ΔW = s·B·A
            return LowRank(b * spec.scaling, a)
        # Conv1D (fan_in_fan_out) stores W as in×out, embeddings as vocab×dim: ΔW = s·(B·A)ᵀ = s·Aᵀ·Bᵀ
        return LowRank(a.T * spec.scaling, b.T)

    def delta_shape(self, module: str) -> Tuple[int, int]:
        spec = self.modules[module]
        a, b = self.weights.shapes[spec.a_key], self.weights.shapes[spec.b_key]
        return (b[0], a[1]) if spec.layout == "linear" else (a[1], b[0])

    def bias_delta(self, module: str) -> Optional[torch.Tensor]:
        spec = self.modules[module]
        return None if spec.bias_key is None else self.weights.get(spec.bias_key) * spec.scaling

    def saved_tensor(self, name: str) -> torch.Tensor:
        return self.weights.get(self.saved_tensors[name])

    def summary(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        return {
            "path": str(self.path),
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": self.use_rslora,
            "ranks": ranks,
            "lora_modules": len(self.modules),
            "saved_tensors": sorted(self.saved_tensors),
        }

    def module_names(self) -> List[str]:
        return sorted(self.modules)
