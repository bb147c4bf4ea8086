"""Extensions of mergekit's MergePlanner, applied by the import hook.

* **Parameters are checked** before any tensor is touched: an unknown name, a
  per-merge parameter set per model (mergekit would silently ignore both), or
  a bad policy value stops the merge with a message naming it.
* **Component policies** (:mod:`mergekit_mllm.policy`) are decided per output
  tensor; tensors whose policy is ``base``/``average`` are planned with the
  corresponding policy method instead of the recipe's method, so policies work
  with every merge method.
* **Completeness guard**: once the plan is built, every tensor present in an
  input checkpoint must be produced; otherwise the merge stops before writing
  and lists what would be dropped (``allow_missing_tensors: true`` opts out).
"""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from mergekit_mllm import policy
from mergekit_mllm.architectures import meta_for

LOG = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A recipe problem found before merging; the message names the key."""


@dataclass
class MergeRecord:
    """What the planner decided, for the merge report and the model card."""

    method: Optional[str] = None
    family: Optional[str] = None
    layout: Optional[str] = None
    architecture_source: Optional[str] = None
    preset: Optional[str] = None
    policies: Dict[str, str] = field(default_factory=dict)
    decisions: Counter = field(default_factory=Counter)  # (component, kind, action) -> tensors
    tensors_planned: int = 0
    missing_allowed: List[str] = field(default_factory=list)


CURRENT_RECORD: contextvars.ContextVar[Optional[MergeRecord]] = contextvars.ContextVar(
    "mergekit_mllm_record", default=None
)

_POLICY_SPECS = {key: ParameterSpec(key, Optional[str], ParameterScope.SHARED, default=None) for key in
                 policy.POLICY_KEYS + ("preset", "chat_template_donor")}
_BOOL_SPEC = ParameterSpec("allow_missing_tensors", bool, ParameterScope.SHARED, default=False)


# ------------------------------------------------------------------ checks


def _leaf_values(setting: Any) -> Iterable[Any]:
    """Scalar values inside a mergekit ParameterSetting (filters, gradients)."""
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        yield from _leaf_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaf_values(item)
    else:
        yield setting


def _parameter_blocks(config) -> Iterable[Tuple[str, Optional[dict], Any]]:
    """(where, parameters, model-or-None) for every parameters block of a recipe."""
    yield "the top-level `parameters:`", config.parameters, None
    for model in config.models or ():
        yield f"`parameters:` of model {model.model}", model.parameters, model.model
    for name, module in (config.modules or {}).items():
        yield f"`parameters:` of module {name}", module.parameters, None
        for model in module.models or ():
            yield f"`parameters:` of model {model.model} in module {name}", model.parameters, model.model
        for index, slice_ in enumerate(module.slices or ()):
            yield f"`parameters:` of module {name} slice {index}", slice_.parameters, None
            for source in slice_.sources:
                yield f"`parameters:` of {source.model} in module {name} slice {index}", source.parameters, source.model
    for index, slice_ in enumerate(config.slices or ()):
        yield f"`parameters:` of slice {index}", slice_.parameters, None
        for source in slice_.sources:
            yield f"`parameters:` of {source.model} in slice {index}", source.parameters, source.model


def check_recipe_parameters(config, method) -> None:
    """Reject unknown, misplaced and malformed parameters (mergekit ignores them)."""
    spec = method.spec
    shared = {p.name for p in spec.shared_parameters}
    per_model = {p.name for p in spec.input_parameters}
    non_base = {p.name for p in spec.input_parameters if p.scope == ParameterScope.NON_BASE}
    for where, parameters, model in _parameter_blocks(config):
        for key, setting in (parameters or {}).items():
            if model is None:
                if key not in shared | per_model | set(policy.PLUGIN_OPTIONS):
                    raise RecipeError(
                        f"unknown parameter {key!r} in {where} for merge method {spec.name!r}; "
                        f"it accepts {', '.join(sorted(shared | per_model)) or 'no parameters'} and the "
                        f"mergekit-mllm options {', '.join(policy.PLUGIN_OPTIONS)}"
                    )
            elif key not in per_model:
                kind = "a global option" if key in shared | set(policy.PLUGIN_OPTIONS) else "unknown"
                raise RecipeError(
                    f"parameter {key!r} in {where} is {kind} for merge method {spec.name!r}; "
                    f"per-model parameters are: {', '.join(sorted(per_model)) or 'none'}"
                )
            elif key in non_base and config.base_model is not None and model == config.base_model:
                raise RecipeError(
                    f"parameter {key!r} in {where} has no effect: it applies to the experts, "
                    "and this model is the base_model"
                )
            for value in _leaf_values(setting):
                if key in policy.POLICY_KEYS:
                    _named(policy.check_action, key, value, where)
                elif key == "preset":
                    _named(lambda _k, v: policy.check_preset(v), key, value, where)


def _named(check, key, value, where):
    try:
        check(key, value)
    except ValueError as error:
        raise RecipeError(f"{error} (in {where})") from None


# ------------------------------------------------------------------ planner


class PlanState:
    """Per-planner state: architecture roles and the policy in force."""

    def __init__(self, planner):
        self.planner = planner
        self.meta = meta_for(planner.arch_info)
        self.family = self.meta.family if self.meta else planner.arch_info.expected_model_type
        self.current_module: Optional[str] = None
        self.record = CURRENT_RECORD.get() or MergeRecord()
        self.record.method = planner.config.merge_method
        self.record.family = self.family
        self.record.layout = self.meta.layout if self.meta else None
        self.record.architecture_source = self.meta.source if self.meta else "mergekit"

    def component(self) -> str:
        module = self.current_module or "default"
        if self.meta and module in self.meta.module_roles:
            return self.meta.module_roles[module]
        return policy.MODULE_COMPONENTS.get(module, "language_model")

    def policies_for(self, tensor_name: str, cfg_reader) -> Tuple[Optional[str], Dict[str, str]]:
        from mergekit.parameter_resolver import resolve_parameter

        sources = tuple(cfg_reader.parameter_sources(None))
        values = {
            key: resolve_parameter(spec, sources, tensor_name=tensor_name, t=cfg_reader.t)
            for key, spec in _POLICY_SPECS.items()
            if key in policy.POLICY_KEYS or key == "preset"
        }
        preset = values.pop("preset")
        policies = policy.preset_policies(preset, self.family)
        policies.update({k: v for k, v in values.items() if v is not None})
        return preset, policies


def _plan_module(original):
    def plan_module(self, module_name, definition):
        self._mergekit_mllm.current_module = module_name
        try:
            return original(self, module_name, definition)
        finally:
            self._mergekit_mllm.current_module = None

    return plan_module


def _plan_tensor(original):
    from mergekit import merge_methods

    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        state: PlanState = self._mergekit_mllm
        preset, policies = state.policies_for(weight.name, cfg_reader)
        decision = policy.decide(state.component(), policy.tensor_kind(weight.name, weight.vocabulary_axis), policies)
        record = state.record
        record.preset = preset or record.preset
        for key, value in policies.items():
            record.policies.setdefault(key, value)
        record.decisions[(decision.component, decision.kind or "-", decision.action)] += 1
        if decision.action == "base" and cfg_reader.base_model is None:
            raise RecipeError(
                f"policy {decision.rule}: base for tensor {weight.name} needs a base_model in the recipe"
            )
        if decision.action == "merge":
            return original(self, weight, weights_in, models, cfg_reader)
        method = self._method
        self._method = merge_methods.get(policy.POLICY_METHODS[decision.action].spec.name)
        try:
            return original(self, weight, weights_in, models, cfg_reader)
        finally:
            self._method = method

    return plan_tensor


def _init(original):
    def __init__(self, config, arch_info, options, out_model_config):
        original(self, config, arch_info, options, out_model_config)
        check_recipe_parameters(config, self._method)
        self._mergekit_mllm = PlanState(self)

    return __init__


def input_tensor_names(models) -> Dict[str, Set[str]]:
    from mergekit.io.tasks import LoaderCache

    return {str(model): set(LoaderCache().get(model).index.tensor_paths) for model in models}


def planned_names(planned) -> Set[str]:
    names: Set[str] = set()
    for weight, _task in planned:
        names.add(weight.name)
        names.update(weight.aliases or ())
        names.update(weight.tied_names or ())
    return names


def check_completeness(planner) -> None:
    from mergekit.parameter_resolver import resolve_parameter

    inputs = input_tensor_names(planner.config.referenced_models())
    produced = planned_names(planner._tensors)
    missing = sorted(set().union(*inputs.values()) - produced)
    state: PlanState = planner._mergekit_mllm
    state.record.tensors_planned = len(planner._tensors)
    if not missing:
        return
    allowed = resolve_parameter(_BOOL_SPEC, (planner.config.parameters,), tensor_name="")
    if allowed:
        LOG.warning("mergekit-mllm: writing a partial merge without %d input tensors", len(missing))
        state.record.missing_allowed = missing
        return
    arch = state.meta.source if state.meta else f"mergekit's definition for {planner.arch_info.expected_model_type}"
    shown = "\n  ".join(missing[:25]) + (f"\n  … and {len(missing) - 25} more" if len(missing) > 25 else "")
    raise RecipeError(
        f"the merge would drop {len(missing)} tensor(s) present in the input checkpoints "
        f"(architecture: {arch}); nothing was written. Missing:\n  {shown}\n"
        "Omitted `modules:`, a layout the architecture definition does not cover, or an expert with extra "
        "tensors cause this. For a deliberately partial merge set `allow_missing_tensors: true` under "
        "`parameters:`."
    )


def _plan(original):
    def _plan_(self):
        original(self)
        check_completeness(self)

    return _plan_


def install(plan_module) -> None:
    """Wrap MergePlanner's methods (idempotent)."""
    planner = plan_module.MergePlanner
    if getattr(planner, "_mergekit_mllm_installed", False):
        return
    planner.__init__ = _init(planner.__init__)
    planner.plan_module = _plan_module(planner.plan_module)
    planner.plan_tensor = _plan_tensor(planner.plan_tensor)
    planner._plan = _plan(planner._plan)
    planner._mergekit_mllm_installed = True
