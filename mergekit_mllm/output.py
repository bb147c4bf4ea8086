"""What a merge leaves on disk: all or nothing, complete, and described.

Wraps ``mergekit.merge.run_merge`` (so stock ``mergekit-yaml`` and
``mergekit-multi`` get it):

* the merge is written to a hidden staging directory next to ``OUT`` and
  moved into place only when it succeeded — a failed merge never leaves a
  half-written output (an existing ``OUT`` survives a failed re-run);
* side files the output needs to load like the base — processor and
  preprocessor configs, chat templates, generation config, tokenizer files
  and, for ``trust_remote_code`` models, the ``*.py`` files — are copied
  from the base; ``chat_template_donor`` picks another model's chat template
  (a *base* model merged with *instruct* experts needs the experts');
* ``mergekit_mllm_report.json`` records the method, parameters, component
  policies actually applied, architecture and versions;
* a recipe's top-level ``hub:`` section pushes the result to the Hub
  afterwards (:mod:`mergekit_mllm.hub.auto`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from mergekit_mllm.planner import CURRENT_RECORD, MergeRecord, RecipeError

LOG = logging.getLogger(__name__)

REPORT_NAME = "mergekit_mllm_report.json"
SIDE_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def side_file_source(model_reference, options, patterns) -> Path:
    """A local directory holding ``model_reference``'s small side files.

    A local model is used as it is. For a Hub id only the matching files are
    fetched: mergekit's own download keeps ``*.json``/weights only, which
    misses ``*.jinja`` templates, ``merges.txt`` and remote-code ``*.py``.
    """
    path = Path(model_reference.model.path)
    if path.is_dir():
        return path
    import huggingface_hub

    return Path(
        huggingface_hub.snapshot_download(
            model_reference.model.path,
            revision=model_reference.model.revision,
            cache_dir=options.transformers_cache,
            allow_patterns=list(patterns),
        )
    )


def copy_side_files(donor: Path, out: Path) -> list:
    """Copy what the output lacks from the donor; returns the copied names."""
    copied = []
    names = list(SIDE_FILES)
    config = donor / "config.json"
    if config.exists() and "auto_map" in json.loads(config.read_text()):
        names += sorted(p.name for p in donor.glob("*.py"))
    for name in names:
        source, target = donor / name, out / name
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)
            copied.append(name)
    return copied


def apply_chat_template(donor: Path, out: Path) -> Optional[str]:
    """Give ``out`` the chat template of ``donor``; returns where it came from."""
    found = None
    for name in CHAT_TEMPLATE_FILES:
        target = out / name
        if target.exists():
            target.unlink()
        if (donor / name).is_file():
            shutil.copyfile(donor / name, target)
            found = found or name
    donor_config, out_config = donor / "tokenizer_config.json", out / "tokenizer_config.json"
    if out_config.exists():
        data = json.loads(out_config.read_text())
        template = json.loads(donor_config.read_text()).get("chat_template") if donor_config.exists() else None
        if template is not None:
            data["chat_template"] = template
            found = found or "tokenizer_config.json"
        else:
            data.pop("chat_template", None)
        out_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if found is None:
        raise RecipeError(f"chat_template_donor {donor} has no chat template")
    return found


def recipe_models(merge_config) -> list:
    """Referenced models in recipe order (mergekit's referenced_models() is a set)."""
    ordered = []
    for model in merge_config.models or ():
        ordered.append(model.model)
    for module in (merge_config.modules or {}).values():
        ordered += [m.model for m in module.models or ()]
        ordered += [s.model for slice_ in module.slices or () for s in slice_.sources]
    ordered += [s.model for slice_ in merge_config.slices or () for s in slice_.sources]
    return list(dict.fromkeys(ordered))


def _versions() -> Dict[str, Optional[str]]:
    import importlib.metadata as md

    versions = {}
    for key, dist in (("mergekit_mllm", "mergekit-mllm"), ("mergekit", "mergekit"),
                      ("transformers", "transformers"), ("torch", "torch")):
        try:
            versions[key] = md.version(dist)
        except md.PackageNotFoundError:
            versions[key] = None
    return versions


def build_report(merge_config, record: MergeRecord, out: Path, side_files: list, chat_template: Optional[str]) -> dict:
    from mergekit import merge_methods

    method = merge_methods.get(merge_config.merge_method)
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    base = merge_config.base_model
    models = [str(m) for m in recipe_models(merge_config) if m != base]
    decisions = [
        {"component": c, "kind": None if k == "-" else k, "action": a, "tensors": n}
        for (c, k, a), n in sorted(record.decisions.items())
    ]
    parameters = {}
    for key, value in (merge_config.parameters or {}).items():
        parameters[key] = value if isinstance(value, (bool, int, float, str)) else json.loads(json.dumps(value, default=str))
    return {
        "merge_method": merge_config.merge_method,
        "method_pretty_name": method.spec.pretty_name,
        "method_url": method.spec.reference_url,
        "base_model": str(base) if base else None,
        "models": models,
        "parameters": parameters,
        "policies": {k: record.policies.get(k, "merge") for k in ("vision_tower", "projector", "language_model",
                                                                  "embeddings", "norms", "biases")},
        "preset": record.preset,
        "decisions": decisions,
        "family": record.family,
        "architecture_source": record.architecture_source,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "tensors": record.tensors_planned,
        "missing_tensors_allowed": record.missing_allowed,
        "side_files_copied": side_files,
        "chat_template_from": chat_template,
        "versions": _versions(),
    }


def _recipe_from(config_source: Optional[str]) -> Dict[str, Any]:
    import yaml

    if not config_source:
        return {}
    try:
        recipe = yaml.safe_load(config_source)
    except yaml.YAMLError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


# Top-level recipe sections of the plugin (mergekit ignores unknown keys).
PLUGIN_SECTIONS = {
    "hub": "push to the Hugging Face Hub after merging",
    "lora_output": "also write the merge as a peft LoRA adapter",
    "compose": "compose single-modality experts that share one LLM",
}


def check_top_level_keys(recipe: Dict[str, Any]) -> None:
    """A misspelt section (``lora_ouput:``) would be ignored by mergekit: refuse it."""
    from mergekit.config import MergeConfiguration

    known = set(MergeConfiguration.model_fields) | set(PLUGIN_SECTIONS)
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(
            f"unknown top-level recipe key(s) {', '.join(map(repr, unknown))}; mergekit accepts "
            f"{', '.join(sorted(MergeConfiguration.model_fields))} and mergekit-mllm adds "
            f"{', '.join(sorted(PLUGIN_SECTIONS))}"
        )


def _validate_hub(recipe: Dict[str, Any]) -> None:
    if "hub" not in recipe:
        return
    from mergekit_mllm.hub.auto import validate_hub_section

    validate_hub_section(recipe)


def publish(staging: Path, final: Path) -> None:
    """Move a finished merge into place, replacing an older output atomically."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.mergekit-mllm-old-{os.getpid()}"
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def wrap_run_merge(original):
    def run_merge(merge_config, out_path, options, config_source=None):
        recipe = _recipe_from(config_source)
        check_top_level_keys(recipe)
        _validate_hub(recipe)
        final = Path(out_path).absolute()
        if final.exists() and not final.is_dir():
            raise RecipeError(f"output path {final} exists and is not a directory")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging_root = final.parent / f".{final.name}.mergekit-mllm-partial-{os.getpid()}"
        staging = staging_root / final.name  # same basename: mergekit names the card after it
        record = MergeRecord()
        token = CURRENT_RECORD.set(record)
        try:
            original(merge_config, str(staging), options, config_source)
            donor = side_file_source(merge_config.base_model or merge_config.referenced_models()[0], options,
                                     SIDE_FILES + ("config.json", "*.py"))
            side_files = copy_side_files(donor, staging)
            template_donor = (merge_config.parameters or {}).get("chat_template_donor")
            chat_template = None
            if template_donor:
                from mergekit.common import ModelReference

                template_source = side_file_source(ModelReference.model_validate(template_donor), options,
                                                   CHAT_TEMPLATE_FILES + ("tokenizer_config.json",))
                chat_template = apply_chat_template(template_source, staging)
            report = build_report(merge_config, record, staging, side_files, chat_template)
            (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
            publish(staging, final)
        finally:
            CURRENT_RECORD.reset(token)
            shutil.rmtree(staging_root, ignore_errors=True)
        LOG.info("mergekit-mllm: merge written to %s", final)
        if "hub" in recipe:
            from mergekit_mllm.hub.auto import push_after_merge

            push_after_merge(final, recipe)

    run_merge.__wrapped__ = original
    return run_merge


def install(merge_module) -> None:
    if getattr(merge_module.run_merge, "__wrapped__", None) is not None:
        return
    merge_module.run_merge = wrap_run_merge(merge_module.run_merge)
