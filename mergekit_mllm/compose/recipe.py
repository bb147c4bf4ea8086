"""``compose:`` recipes through stock ``mergekit-yaml``.

Wraps ``mergekit.merge.run_merge``: a recipe with a ``compose:`` section is
a modality composition (:func:`mergekit_mllm.compose.merge.compose`), which
mergekit's planner cannot do (its experts have different architectures);
any other recipe goes on to mergekit. Installed between the LoRA wrapper and
the output wrapper, so a composition is written into the output wrapper's
staging directory and published atomically like any merge.
"""

from __future__ import annotations

from mergekit_mllm.lora.recipe import recipe_of


def wrap_run_merge(original):
    def run_merge(merge_config, out_path, options, config_source=None):
        from mergekit_mllm.compose.merge import compose, compose_options

        section = compose_options(recipe_of(config_source))
        if section is None:
            return original(merge_config, out_path, options, config_source)
        if "lora_output" in recipe_of(config_source):
            from mergekit_mllm.compose.merge import CompositionError

            raise CompositionError("`lora_output:` is not available for compositions")
        import mergekit_mllm.compose  # noqa: F401  (registers the model with transformers)

        compose(merge_config, out_path, options, section, config_source)

    run_merge._mergekit_mllm_compose = True
    return run_merge


def install(merge_module) -> None:
    """Wrap run_merge (idempotent); after the LoRA wrapper, before the output wrapper."""
    if getattr(merge_module.run_merge, "_mergekit_mllm_compose", False):
        return
    merge_module.run_merge = wrap_run_merge(merge_module.run_merge)
