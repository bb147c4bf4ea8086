"""Read a merge output folder: what was merged, how, and which files to upload.

The folder is only read, never written: a push (failed or not) leaves it as
mergekit left it. The merge is described by ``mergekit_mllm_report.json``
(written by the multimodal layer) or, for plain mergekit outputs, by
``mergekit_config.yml``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mergekit_mllm.hub.errors import OutputFolderError

REPORT_NAME = "mergekit_mllm_report.json"
RECIPE_NAME = "mergekit_config.yml"
CARD_NAME = "README.md"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

# A local copy of a Hub model in the huggingface_hub cache names its repo:
# .../models--OWNER--NAME/snapshots/<commit>/
_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}(/|$)")


@dataclass(frozen=True)
class ModelRef:
    """A model named in the recipe: a Hub id, a local folder, or both."""

    reference: str
    hub_id: Optional[str]
    local_path: Optional[Path]

    @property
    def label(self) -> str:
        if self.hub_id:
            return self.hub_id
        return Path(self.reference).name or self.reference


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def model_ref(reference: str) -> ModelRef:
    """Classify a recipe reference (mergekit's ``model+lora`` keeps the model part)."""
    reference = str(reference).split("+", 1)[0]
    path = Path(reference).expanduser()
    if path.exists():
        local = path.resolve()
        match = _CACHE_SNAPSHOT.search(local.as_posix())
        hub_id = f"{match['owner']}/{match['name']}" if match else None
        return ModelRef(reference, hub_id, local)
    return ModelRef(reference, reference if _is_hub_id(reference) else None, None)


@dataclass(frozen=True)
class OutputFile:
    path_in_repo: str
    size: int
    local_path: Path


@dataclass(frozen=True)
class MergedOutput:
    """Everything the card and the upload need from the output folder."""

    path: Path
    files: Tuple[OutputFile, ...]
    config: Dict[str, Any]
    merge_method: str
    method_name: str
    method_url: Optional[str]
    base: Optional[ModelRef]
    experts: Tuple[ModelRef, ...]
    parameters: Dict[str, Any]
    policies: Optional[Dict[str, str]]
    decisions: Tuple[Dict[str, Any], ...]  # per component: what the planner actually did, tensor counts
    preset: Optional[str]
    versions: Dict[str, str]
    recipe_text: Optional[str]
    has_report: bool


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputFolderError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OutputFolderError(f"{path} must contain a JSON object")
    return data


def list_files(out: Path) -> Tuple[OutputFile, ...]:
    """The files ``upload_folder`` would send (same ignore rules), minus the old card."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    relative = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    kept = filter_repo_objects(relative, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    return tuple(OutputFile(rel, (out / rel).stat().st_size, out / rel) for rel in kept if rel != CARD_NAME)


def _check_weights(out: Path, files: Sequence[OutputFile]) -> None:
    names = {f.path_in_repo for f in files}
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        raise OutputFolderError(f"{out} holds no weights (*.safetensors/*.bin): is the merge finished?")
    for index_name in (n for n in names if n.endswith(".index.json")):
        weight_map = _load_json(out / index_name).get("weight_map", {})
        missing = sorted(set(weight_map.values()) - names)
        if missing:
            raise OutputFolderError(
                f"{out / index_name} lists shards that are not in {out}: {', '.join(missing)} "
                "(an interrupted merge?)"
            )


def _method_info(merge_method: str) -> Tuple[str, Optional[str]]:
    """Pretty name and paper URL from mergekit's registry (covers our methods too)."""
    try:
        from mergekit import merge_methods

        spec = merge_methods.get(merge_method).spec
        return spec.pretty_name or spec.name, spec.reference_url or None
    except Exception:  # unknown to this installation: still publishable
        return merge_method, None


def _recipe_models(recipe: Dict[str, Any]) -> List[str]:
    """Model references of a mergekit recipe, in order (``models:`` or ``slices:``)."""
    references: List[str] = []

    def add(entry):
        reference = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(reference, dict):  # mergekit's expanded ModelReference form
            reference = reference.get("model", {}).get("path") if isinstance(reference.get("model"), dict) else reference.get("path")
        if reference and str(reference) not in references:
            references.append(str(reference))

    for entry in recipe.get("models") or []:
        add(entry)
    for piece in recipe.get("slices") or []:
        for entry in piece.get("sources") or []:
            add(entry)
    return references


def _parse_recipe(out: Path, recipe_text: Optional[str]) -> Optional[Dict[str, Any]]:
    if recipe_text is None:
        return None
    import yaml

    try:
        recipe = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError as exc:
        raise OutputFolderError(f"{out / RECIPE_NAME} is not valid YAML: {exc}") from exc
    if not isinstance(recipe, dict):
        raise OutputFolderError(f"{out / RECIPE_NAME} is not a mergekit recipe")
    return recipe


def _in_recipe_order(references: List[str], recipe: Optional[Dict[str, Any]]) -> List[str]:
    """The report's models in the order the recipe lists them (the order users think in)."""
    order = {reference: i for i, reference in enumerate(_recipe_models(recipe or {}))}
    return sorted(references, key=lambda r: order.get(r.split("+", 1)[0], len(order)))


def read_output(out: Path) -> MergedOutput:
    out = Path(out).expanduser()
    if not out.exists():
        raise OutputFolderError(f"output folder {out} does not exist (check the path, or run mergekit-yaml first)")
    if not out.is_dir():
        raise OutputFolderError(f"{out} is not a folder: pass the merge output directory")
    out = out.resolve()
    if not (out / "config.json").is_file():
        raise OutputFolderError(f"{out} has no config.json: not a model folder")
    files = list_files(out)
    _check_weights(out, files)
    config = _load_json(out / "config.json")

    recipe_text = (out / RECIPE_NAME).read_text(encoding="utf-8") if (out / RECIPE_NAME).is_file() else None
    recipe = _parse_recipe(out, recipe_text)
    report_path = out / REPORT_NAME
    decisions: Tuple[Dict[str, Any], ...] = ()
    if report_path.is_file():
        report = _load_json(report_path)
        merge_method = str(report.get("merge_method") or "unknown")
        pretty, url = report.get("method_pretty_name"), report.get("method_url")
        if not pretty:
            pretty, url = _method_info(merge_method)
        base_reference = report.get("base_model")
        expert_references = _in_recipe_order([str(m) for m in report.get("models") or []], recipe)
        parameters = dict(report.get("parameters") or {})
        policies, preset = report.get("policies"), report.get("preset")
        decisions = tuple(d for d in report.get("decisions") or [] if isinstance(d, dict))
        versions = {k: str(v) for k, v in (report.get("versions") or {}).items() if v is not None}
    elif recipe is not None:
        merge_method = str(recipe.get("merge_method") or "unknown")
        pretty, url = _method_info(merge_method)
        base_reference = recipe.get("base_model")
        if isinstance(base_reference, dict):
            base_reference = base_reference.get("model")
        expert_references = [r for r in _recipe_models(recipe) if r != str(base_reference)]
        parameters = dict(recipe.get("parameters") or {})
        policies, preset, versions = None, None, {}
    else:
        raise OutputFolderError(
            f"{out} has neither {REPORT_NAME} nor {RECIPE_NAME}: not a mergekit output, nothing to describe"
        )
    return MergedOutput(
        path=out,
        files=files,
        config=config,
        merge_method=merge_method,
        method_name=str(pretty),
        method_url=url,
        base=model_ref(str(base_reference)) if base_reference else None,
        experts=tuple(model_ref(r) for r in expert_references),
        parameters=parameters,
        policies=dict(policies) if policies else None,
        decisions=decisions,
        preset=preset,
        versions=versions,
        recipe_text=recipe_text,
        has_report=report_path.is_file(),
    )
