"""The ``mergekit-mllm`` command.

Subcommands live next to the code they drive and are imported only when used
(``LAZY_SUBCOMMANDS``), so ``mergekit-mllm --help`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Dict

import click

# name -> "module:attribute" of a click command
LAZY_SUBCOMMANDS: Dict[str, str] = {
    "methods": "mergekit_mllm.cli:methods_command",
    "doctor": "mergekit_mllm.cli:doctor_command",
    "push": "mergekit_mllm.hub.cli:push_command",
    "sweep": "mergekit_mllm.sweep:sweep_command",
    "main": "mergekit_mllm.main_job:main_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(LAZY_SUBCOMMANDS)

    def get_command(self, ctx, name):
        target = LAZY_SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module_name.rsplit(".", 1)[0]):
                raise click.ClickException(f"subcommand {name!r} is not available in this build") from exc
            raise
        return getattr(module, attribute)


@click.group(cls=LazyGroup)
@click.version_option(package_name="mergekit-mllm")
def main():
    """Merge multimodal LLM experts with stock mergekit (OptMerge and baselines)."""


def _format_default(spec) -> str:
    from mergekit.merge_methods.base import MISSING

    if spec.default is MISSING:
        return "required"
    if spec.default is None:
        return "auto"
    return repr(spec.default)


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods_command(as_json: bool):
    """List every mergekit-mllm method, its parameters and its paper."""
    from mergekit_mllm.methods import METHODS

    rows = []
    for method in METHODS:
        spec = method.spec
        rows.append(
            {
                "name": spec.name,
                "pretty_name": spec.pretty_name,
                "paper": method.declaration.citation,
                "url": spec.reference_url,
                "parameters": [
                    {
                        "name": p.name,
                        "scope": p.scope.value,
                        "default": _format_default(p),
                        "description": p.description,
                    }
                    for p in spec.parameters
                ],
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  ({row['pretty_name']})")
        click.echo(f"  paper: {row['paper']}  {row['url']}")
        for p in row["parameters"]:
            scope = " [per model]" if p["scope"] != "shared" else ""
            click.echo(f"    {p['name']:<22} default {p['default']:<8}{scope}  {p['description']}")
        click.echo("")
    click.echo("Task Arithmetic is mergekit's own `task_arithmetic` (identical to the paper's).")


def doctor_report() -> dict:
    """Facts about this installation (used by ``doctor`` and the tests)."""
    import importlib.metadata as md

    report: dict = {"python": sys.version.split()[0]}
    for dist in ("mergekit-mllm", "mergekit", "transformers", "torch", "peft", "huggingface_hub"):
        try:
            report[dist] = md.version(dist)
        except md.PackageNotFoundError:
            report[dist] = None
    hook = sys.modules.get("_mergekit_mllm_hook")
    report["hook_active"] = bool(hook and hook.state["installed"])
    report["hook_error"] = hook.state["failed"] if hook else None

    from mergekit import merge_methods  # triggers the hook

    from mergekit_mllm import _plugin
    from mergekit_mllm.methods import METHOD_NAMES

    names = {m.spec.name for m in merge_methods.registered_methods()}
    report["methods_registered"] = [n for n in METHOD_NAMES if n in names]
    report["methods_missing"] = [n for n in METHOD_NAMES if n not in names]
    report["extensions_applied"] = _plugin.applied_extensions()
    report["fused_kernels"] = _fused_kernels_status()
    try:
        from mergekit_mllm.architectures import installed_architectures

        report["architectures_patched"] = installed_architectures()
    except ImportError:
        report["architectures_patched"] = []
    return report


def _fused_kernels_status() -> str:
    """Whether element-wise methods can use the fused kernels (mergekit_mllm.ops.fused), and how
    they are compiled."""
    import os
    import shutil

    from mergekit_mllm.ops import fused, native

    try:
        mode = fused.mode()
        backend = fused.backend()
        ties = ("TIES pass: one-loop C++ kernel, built once per machine (MERGEKIT_MLLM_NATIVE=0: inductor's)"
                if native.enabled() else "TIES pass: inductor's (MERGEKIT_MLLM_NATIVE=0)")
    except ValueError as error:
        return f"invalid setting: {error}"
    if mode == "off":
        return "off (MERGEKIT_MLLM_COMPILE=0)"
    # the compiler inductor and the native build call (CXX, else g++): another one on PATH would not be used
    wanted = fused.compiler()
    compiler = shutil.which(wanted)
    if compiler is None:
        return (f"{mode}, but the C++ compiler {wanted!r} ({'CXX' if os.environ.get('CXX') else 'set CXX to use another'}) "
                "was not found: element-wise methods run eagerly")
    scope = "every CPU tensor" if mode == "on" else f"CPU tensors of >= {fused.MIN_ELEMENTS:,} entries"
    how = (f"ahead-of-time packages in {fused.cache_root()}" if backend == "aot"
           else "torch.compile in each process (MERGEKIT_MLLM_COMPILE_BACKEND=jit)")
    return f"{mode}: {scope} (C++ compiler {compiler}; {how}; {ties})"


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(as_json: bool):
    """Check that stock mergekit sees the plugin; print versions and patches."""
    report = doctor_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if isinstance(value, list):
                value = ", ".join(value) if value else "-"
            click.echo(f"{key:<22} {value}")
    healthy = report["hook_active"] and not report["hook_error"] and not report["methods_missing"]
    if not healthy:
        click.echo(
            "mergekit-mllm is NOT active in stock mergekit: reinstall with `pip install mergekit-mllm` "
            "(the wheel installs mergekit_mllm.pth into site-packages).",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
