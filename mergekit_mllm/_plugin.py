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


# module name -> extensions applied after it loads. Other parts of the plugin
# (architectures, planner guards, atomic output) add themselves here.
EXTENSIONS: Dict[str, List[Callable[[ModuleType], None]]] = {
    "mergekit.merge_methods": [_register_methods],
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
