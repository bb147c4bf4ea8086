"""What a merge does with LoRA: adapter experts in, an adapter out.

Wraps ``mergekit.merge.run_merge`` *inside* the plugin's output wrapper
(:mod:`mergekit_mllm.output`), so everything written here lands in the
staging directory and is published atomically with the merge:

* every adapter directory among the recipe's models is an expert over the
  recipe's ``base_model`` for the duration of the merge;
* a top-level ``lora_output:`` section also writes the merged model as a peft
  adapter over the base, inside the output directory::

      lora_output:
        rank: 16                 # required: LoRA rank of every adapted weight
        path: lora_adapter       # optional, relative to the output directory
        modules_to_save: true    # optional: changed norms etc. saved whole (false: dropped, reported)

* ``mergekit_mllm_lora.json`` in the output records the LoRA experts (ranks,
  tensors served from factors, how many weights took a low-rank kernel) and
  the adapter written (energy kept per tensor and overall).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from mergekit_mllm.lora import inputs
from mergekit_mllm.lora.adapter import AdapterError

LOG = logging.getLogger(__name__)

SECTION = "lora_output"
OPTIONS = {"rank": int, "path": str, "modules_to_save": bool}
DEFAULT_PATH = "lora_adapter"
REPORT_NAME = "mergekit_mllm_lora.json"


class LoraRecipeError(ValueError):
    """A problem with LoRA inputs or the lora_output section; the message names it."""


def recipe_of(config_source: Optional[str]) -> Dict[str, Any]:
    import yaml

    try:
        recipe = yaml.safe_load(config_source) if config_source else {}
    except yaml.YAMLError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


def lora_output_options(recipe: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The validated ``lora_output:`` section, or None."""
    if SECTION not in recipe:
        return None
    section = recipe[SECTION]
    if not isinstance(section, dict):
        raise LoraRecipeError(f"`{SECTION}:` must be a mapping with at least `rank:`; got {section!r}")
    unknown = sorted(set(section) - set(OPTIONS))
    if unknown:
        raise LoraRecipeError(f"unknown key(s) {unknown} in `{SECTION}:`; known: {', '.join(OPTIONS)}")
    for key, kind in OPTIONS.items():
        if key in section and (not isinstance(section[key], kind) or (kind is int and isinstance(section[key], bool))):
            raise LoraRecipeError(f"`{SECTION}.{key}` must be {kind.__name__}; got {section[key]!r}")
    if "rank" not in section or section["rank"] < 1:
        raise LoraRecipeError(f"`{SECTION}.rank` (a positive integer) is required")
    path = Path(section.get("path", DEFAULT_PATH))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise LoraRecipeError(f"`{SECTION}.path` must be a relative path inside the output; got {str(path)!r}")
    return {"rank": section["rank"], "path": str(path), "modules_to_save": section.get("modules_to_save", True)}


def _bases(merge_config) -> Dict[object, object]:
    """Each plain adapter directory among the recipe's models → the recipe's base_model."""
    references = inputs.lora_references(merge_config.referenced_models())
    base = merge_config.base_model
    if base is not None and inputs.adapter_path_of(base) is not None:
        raise LoraRecipeError(f"base_model {base} is a LoRA adapter; the base must be a full model")
    return {ref: base for ref in references if ref.lora is None and base is not None}


def _write_report(out: Path, merge_config, extraction) -> None:
    references = inputs.lora_references(merge_config.referenced_models())
    if not references and extraction is None:
        return
    experts = {}
    for reference in references:
        expert = inputs.expert_for(reference)
        experts[str(reference)] = expert.summary()
    report = {
        "lora_experts": experts,
        "low_rank_kernel_weights": dict(inputs.LOW_RANK_MERGES),
        "lora_output": None if extraction is None else extraction.as_dict(),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def wrap_run_merge(original):
    def run_merge(merge_config, out_path, options, config_source=None):
        recipe = recipe_of(config_source)
        output = lora_output_options(recipe)
        bases = _bases(merge_config)
        inputs.LOW_RANK_MERGES.clear()
        with inputs.use_bases(bases):
            try:
                for reference in inputs.lora_references(merge_config.referenced_models()):
                    inputs.expert_for(reference)  # parse and validate every adapter before merging
            except AdapterError as error:
                raise LoraRecipeError(str(error)) from None
            original(merge_config, out_path, options, config_source)
            extraction = None
            if output is not None:
                from mergekit_mllm.lora.extract import energy_summary, extract_adapter

                base = merge_config.base_model
                if base is None:
                    raise LoraRecipeError(f"`{SECTION}:` needs a base_model in the recipe")
                extraction = extract_adapter(
                    out_path,
                    base.local_path(cache_dir=options.transformers_cache),
                    Path(out_path) / output["path"],
                    rank=output["rank"],
                    modules_to_save=output["modules_to_save"],
                    base_model_name_or_path=str(base),
                    trust_remote_code=options.trust_remote_code,
                )
                LOG.info("mergekit-mllm: LoRA adapter written to %s (%s)", output["path"], energy_summary(extraction))
                extraction.path = output["path"]
            _write_report(Path(out_path), merge_config, extraction)

    run_merge._mergekit_mllm_lora = True
    return run_merge


def install(merge_module) -> None:
    """Wrap run_merge (idempotent). Must run before the output wrapper, which
    then wraps this one and publishes what it writes."""
    if getattr(merge_module.run_merge, "_mergekit_mllm_lora", False):
        return
    merge_module.run_merge = wrap_run_merge(merge_module.run_merge)
