"""What happens when mergekit's modules load (called by the import hook).

Each extension is applied once, after the mergekit module it extends has fully
executed, so mergekit's own import order is never disturbed.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Callable, Dict, List

_applied: set[str] = set()


def _importing(module_name: str, attribute: str) -> bool:
    """True while ``module_name`` is itself mid-import (it imported mergekit).

    Such a module finishes by applying its extension itself; importing it
    here would only find a partially initialised module.
    """
    module = sys.modules.get(module_name)
    return module is not None and not hasattr(module, attribute)


def _register_methods(_module: ModuleType) -> None:
    if _importing("mergekit_mllm.methods", "register_all"):
        return
    from mergekit_mllm.methods import register_all

    register_all()


def _register_policy_methods(_module: ModuleType) -> None:
    from mergekit_mllm.policy import register_policy_methods

    register_policy_methods()


def _install_architectures(architecture_module: ModuleType) -> None:
    from mergekit_mllm import architectures

    architectures.install(sys.modules["mergekit.architecture.json_definitions"])
    original = architecture_module.get_architecture_info
    if getattr(original, "__wrapped__", None) is None:

        def get_architecture_info(config, options):
            return architectures.get_architecture_info(original, config, options)

        get_architecture_info.__wrapped__ = original
        architecture_module.get_architecture_info = get_architecture_info


def _extend_planner(plan_module: ModuleType) -> None:
    from mergekit_mllm.planner import install

    install(plan_module)


def _wrap_run_merge(merge_module: ModuleType) -> None:
    from mergekit_mllm.output import install

    install(merge_module)


def _install_lora_inputs(_module: ModuleType) -> None:
    from mergekit_mllm.lora.inputs import install

    install()


def _wrap_run_merge_lora(merge_module: ModuleType) -> None:
    # Before _wrap_run_merge: the output wrapper then wraps this one, so the
    # adapter output is written into its staging directory.
    from mergekit_mllm.lora.recipe import install

    install(merge_module)


def _wrap_run_merge_compose(merge_module: ModuleType) -> None:
    # Between the LoRA and output wrappers: `compose:` recipes bypass
    # mergekit's planner but are still staged and published by the output wrapper.
    from mergekit_mllm.compose.recipe import install

    install(merge_module)


# module name -> extensions applied right after it has executed
EXTENSIONS: Dict[str, List[Callable[[ModuleType], None]]] = {
    "mergekit.architecture": [_install_architectures],
    "mergekit.merge_methods": [_register_methods, _register_policy_methods],
    "mergekit.plan": [_extend_planner, _install_lora_inputs],
    "mergekit.merge": [_wrap_run_merge_lora, _wrap_run_merge_compose, _wrap_run_merge],
}


def on_module_loaded(fullname: str, module: ModuleType) -> None:
    for extension in EXTENSIONS.get(fullname, ()):
        key = f"{fullname}:{extension.__module__}.{extension.__qualname__}"
        if key in _applied:
            continue
        extension(module)
        _applied.add(key)


def install() -> None:
    """Apply every extension now (importing mergekit as needed); idempotent."""
    import importlib

    for fullname in EXTENSIONS:
        module = sys.modules.get(fullname) or importlib.import_module(fullname)
        on_module_loaded(fullname, module)


def applied_extensions() -> List[str]:
    return sorted(_applied)
