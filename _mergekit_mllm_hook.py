"""Lazy import hook that plugs mergekit-mllm into stock mergekit.

mergekit has no plugin discovery, so ``mergekit_mllm.pth`` imports this module
at interpreter start-up. It must stay tiny and stdlib-only: it installs a
meta-path finder that does nothing until one of the watched mergekit modules is
imported, then lets that module execute normally and afterwards hands it to
``mergekit_mllm._plugin.on_module_loaded``. torch and the plugin are never
imported by this file itself.

If the plugin fails, mergekit keeps working without it and the failure is
reported once on stderr (``mergekit-mllm doctor`` shows it too).
"""

import sys

# Modules whose completion we react to, in the order mergekit imports them.
WATCHED = (
    "mergekit.architecture",
    "mergekit.merge_methods",
    "mergekit.plan",
    "mergekit.merge",
)

state = {"installed": False, "failed": None, "loaded": []}


def _report_failure(exc):
    if state["failed"] is None:
        state["failed"] = "%s: %s" % (type(exc).__name__, exc)
        sys.stderr.write(
            "mergekit-mllm: plugin failed to load (%s); mergekit continues "
            "without it. Run `mergekit-mllm doctor` for details.\n" % state["failed"]
        )


def _after_exec(fullname, module):
    state["loaded"].append(fullname)
    if state["failed"] is not None:
        return
    try:
        from mergekit_mllm._plugin import on_module_loaded

        on_module_loaded(fullname, module)
    except Exception as exc:  # never break mergekit itself
        _report_failure(exc)


class _MergekitFinder:
    """Meta-path finder that wraps the real loader of watched modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module, _original=original_exec, _name=fullname):
            _original(module)
            _after_exec(_name, module)

        # Loaders of source files are per-module objects; shadowing the bound
        # method on this instance leaves every other module untouched.
        spec.loader.exec_module = exec_module
        return spec


def install():
    if state["installed"]:
        return
    state["installed"] = True
    sys.meta_path.insert(0, _MergekitFinder())
    # Started from an environment where mergekit was already imported (e.g.
    # the hook installed late by hand): apply immediately, in order.
    for name in WATCHED:
        module = sys.modules.get(name)
        if module is not None:
            _after_exec(name, module)


install()
