"""The model card of a merge: Hub metadata from ``ModelCardData``/``EvalResult``
and a Markdown body (method, inputs, component policies, scores, recipe,
versions).

Front matter is produced only by ``ModelCardData.to_yaml`` (no hand-built
YAML), so ``ModelCard.load`` parses the same ``eval_results`` back.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_mllm.hub.output import MergedOutput, ModelRef
from mergekit_mllm.hub.results import EvalSet, ResultsFile

PLOT_NAME = "eval_scores.png"
HUB_URL = "https://huggingface.co"
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"
FIXED_TAGS = ("merge", "mergekit", "mergekit-mllm")

# model_type values of vision-language models (config.json); a ``vision_config``
# entry or a vision/VL architecture name is recognised as well.
VLM_MODEL_TYPES = frozenset({
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "llava_next", "llava_onevision",
    "internvl", "internvl_chat", "idefics2", "idefics3", "smolvlm", "mllama", "paligemma",
    "gemma3", "phi3_v", "minicpmv", "molmo", "pixtral", "mistral3", "kimi_vl", "glm4v", "aria",
})
_VLM_ARCHITECTURE = re.compile(r"VL|Vision|Llava|LLaVA|InternVL|ImageTextToText|Idefics|Mllama|PaliGemma")


def pipeline_tag_for(config: Dict) -> Optional[str]:
    """The Hub task of a checkpoint, decided from its config.json."""
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    if (
        "vision_config" in config
        or "mm_vision_tower" in config  # original LLaVA configs
        or model_type in VLM_MODEL_TYPES
        or any(_VLM_ARCHITECTURE.search(a) for a in architectures)
    ):
        return "image-text-to-text"
    if "audio_config" in config:
        return "audio-text-to-text"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "text-generation"
    return None


@dataclass(frozen=True)
class LicenseInfo:
    license: str
    license_name: Optional[str] = None
    license_link: Optional[str] = None
    source: str = ""


def license_from_card(card_path: Path, source: str) -> Optional[LicenseInfo]:
    """The license in a model card's front matter, if it declares one."""
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(card_path, ignore_metadata_errors=True).data
    except Exception:  # a malformed base card must not block publishing
        return None
    if not data.license:
        return None
    return LicenseInfo(data.license, data.get("license_name"), data.get("license_link"), source)


def local_base_license(output: MergedOutput) -> Optional[LicenseInfo]:
    base = output.base
    if base is None or base.local_path is None or not (base.local_path / "README.md").is_file():
        return None
    return license_from_card(base.local_path / "README.md", f"the base model's card ({base.local_path / 'README.md'})")


def hub_base_models(output: MergedOutput) -> List[str]:
    """Hub ids of the base and every expert (local-only inputs cannot be linked)."""
    ids: List[str] = []
    for ref in ([output.base] if output.base else []) + list(output.experts):
        if ref.hub_id and ref.hub_id not in ids:
            ids.append(ref.hub_id)
    return ids


def eval_results_for(results: ResultsFile, default_task_type: str):
    """One ``EvalResult`` per task of the merged model's results."""
    from huggingface_hub import EvalResult

    evaluated = []
    for task in results.tasks.values():
        settings = {
            "suite": f"eval_suite {results.suite_version}" if results.suite_version else "eval_suite",
            "prompt_version": task.prompt_version,
            "num_items": task.num_items,
            "parse_failures": task.parse_failures,
            "dtype": results.model.get("dtype"),
            "attn_implementation": results.model.get("attn_implementation"),
        }
        evaluated.append(
            EvalResult(
                task_type=task.task_type or default_task_type,
                task_name=task.capability,
                dataset_type=task.dataset_id,
                dataset_name=task.task,
                dataset_split=task.split,
                dataset_revision=task.dataset_revision,
                metric_type=task.metric,
                metric_value=task.score,
                metric_args={k: v for k, v in settings.items() if v is not None},
            )
        )
    return evaluated


def card_data(output: MergedOutput, evalset: EvalSet, *, model_name: str, license: Optional[LicenseInfo]):
    from huggingface_hub import ModelCardData

    pipeline_tag = pipeline_tag_for(output.config)
    bases = hub_base_models(output)
    method_tag = output.merge_method.lower()
    tags = list(FIXED_TAGS) + ([method_tag] if method_tag not in FIXED_TAGS else [])
    extra = {"base_model_relation": "merge"} if bases else {}
    eval_results = eval_results_for(evalset.merged, pipeline_tag or "text-generation") if evalset.merged else None
    return ModelCardData(
        base_model=bases or None,
        license=license.license if license else None,
        license_name=license.license_name if license else None,
        license_link=license.license_link if license else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        **extra,
    )


# ---------------------------------------------------------------------------
# Markdown body: one function per section.


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _link(ref: ModelRef) -> str:
    if ref.hub_id:
        return f"[{ref.hub_id}]({HUB_URL}/{ref.hub_id})"
    return f"`{ref.reference}` (local)"


def _fence(text: str, language: str) -> List[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    return [fence + language, text.rstrip("\n"), fence]


def _method_section(output: MergedOutput) -> List[str]:
    method = f"[{output.method_name}]({output.method_url})" if output.method_url else output.method_name
    lines = ["## Merge method", "", f"- **Method:** {method} (`merge_method: {output.merge_method}`)"]
    if output.method_url:
        lines.append(f"- **Paper:** {output.method_url}")
    if output.preset:
        lines.append(f"- **Preset:** `{output.preset}`")
    if output.parameters:
        lines += ["", "Parameters:", ""]
        lines += _table(["Parameter", "Value"], [[f"`{k}`", f"`{v}`"] for k, v in output.parameters.items()])
    return lines


def _models_section(output: MergedOutput) -> List[str]:
    lines = ["## Models merged", ""]
    if output.base is not None:
        lines.append(f"- **Base:** {_link(output.base)}")
    lines += [f"- **Expert:** {_link(ref)}" for ref in output.experts]
    if any(ref.hub_id is None for ref in ([output.base] if output.base else []) + list(output.experts)):
        lines += ["", "Local inputs are listed by path; only Hub models appear in `base_model`."]
    return lines


def _policies_section(output: MergedOutput) -> List[str]:
    lines = ["## Components", ""]
    if not output.policies and not output.decisions:
        lines.append(
            "Not recorded: this output has no `mergekit_mllm_report.json` (a plain mergekit merge), "
            "so every tensor went through the merge method."
        )
        return lines
    if output.decisions:
        lines += ["What the merge did to each part of the model (tensor counts from the merge report):", ""]
        lines += _table(
            ["Component", "Kind", "Action", "Tensors"],
            [[f"`{d.get('component')}`", d.get("kind") or "weights", f"`{d.get('action')}`", d.get("tensors", "—")]
             for d in output.decisions],
        )
        lines.append("")
    if output.policies:
        lines += ["Component policies of the recipe" + (f" (preset `{output.preset}`)" if output.preset else "") + ":", ""]
        lines += _table(["Component", "Policy"], [[f"`{k}`", f"`{v}`"] for k, v in output.policies.items()])
    return lines


def _score_table(evalset: EvalSet, base_label: str) -> List[str]:
    columns: List[Tuple[str, Optional[ResultsFile]]] = list(evalset.columns(base_label))
    if evalset.merged is None:  # keep the merge's column visible: "not evaluated yet"
        columns.insert(0, ("This merge", None))
    tasks = evalset.task_names()

    def score(results: Optional[ResultsFile], task: str) -> Optional[float]:
        return results.tasks[task].score if results is not None and task in results.tasks else None

    rows = []
    for task in tasks:
        scores = [score(results, task) for _, results in columns]
        present = [s for s in scores if s is not None]
        best = max(present) if len(present) > 1 else None  # nothing to compare against: no bold
        metric = next(r.tasks[task].metric for _, r in columns if r is not None and task in r.tasks)
        cells = ["—" if s is None else (f"**{s:.2f}**" if s == best else f"{s:.2f}") for s in scores]
        rows.append([task, metric, *cells])
    averages = []
    for _, results in columns:
        values = [score(results, task) for task in tasks]
        averages.append("—" if None in values else f"{sum(values) / len(values):.2f}")
    rows.append(["**Average**", "", *averages])
    return _table(["Task", "Metric", *(label for label, _ in columns)], rows)


def _task_details(results: ResultsFile) -> List[str]:
    rows = []
    for task in results.tasks.values():
        dataset = task.dataset_id + (f"@{task.dataset_revision}" if task.dataset_revision else "")
        rows.append([
            task.task, f"`{dataset}`", task.split or "—", task.metric,
            task.num_items if task.num_items is not None else "—",
            task.parse_failures if task.parse_failures is not None else "—",
            task.prompt_version or "—",
        ])
    return _table(["Task", "Dataset", "Split", "Metric", "Items", "Parse failures", "Prompt set"], rows)


def _evaluation_section(evalset: EvalSet, output: MergedOutput, plot_name: Optional[str]) -> List[str]:
    lines = ["## Evaluation", ""]
    if evalset.empty:
        return lines + ["No evaluation results were attached to this upload."]
    lines.append("Scores (0–100) measured with eval_suite; the best score of each row is in bold.")
    lines.append("")
    base_label = output.base.label if output.base else "base"
    lines += _score_table(evalset, base_label)
    if plot_name:
        lines += ["", f"![Scores per task]({plot_name})"]
    reference = evalset.merged or evalset.base or evalset.experts[0][1]
    model = reference.model
    lines += [
        "",
        f"Measured with eval_suite {reference.suite_version or '(version not recorded)'}"
        + (f" on {reference.created}" if reference.created else "")
        + f"; model loaded in `{model.get('dtype', '?')}` with `{model.get('attn_implementation', '?')}` attention"
        + f" on `{model.get('device', '?')}`" + (f" (adapter `{model['adapter']}`)" if model.get("adapter") else "") + ".",
        "",
    ]
    lines += _task_details(reference)
    if evalset.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in evalset.notes]
    return lines


def _recipe_section(output: MergedOutput) -> List[str]:
    lines = ["## Recipe", ""]
    if output.recipe_text:
        return lines + ["The mergekit configuration that produced this model:", ""] + _fence(output.recipe_text, "yaml")
    return lines + ["The output folder holds no `mergekit_config.yml`."]


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _versions_section(output: MergedOutput, evalset: EvalSet) -> List[str]:
    merge_time = output.versions
    rows = []
    for label, key, dist in (
        ("mergekit-mllm", "mergekit_mllm", "mergekit-mllm"),
        ("mergekit", "mergekit", "mergekit"),
        ("transformers", "transformers", "transformers"),
        ("torch", "torch", "torch"),
        ("huggingface_hub", "huggingface_hub", "huggingface_hub"),
    ):
        rows.append([label, merge_time.get(key, "not recorded"), installed_version(dist)])
    reference = evalset.merged or evalset.base or (evalset.experts[0][1] if evalset.experts else None)
    if reference is not None:
        prompts = sorted({t.prompt_version for t in reference.tasks.values() if t.prompt_version})
        rows.append(["eval_suite", reference.suite_version or "not recorded", "—"])
        rows.append(["eval prompt set", ", ".join(prompts) or "not recorded", "—"])
    return ["## Versions", ""] + _table(["Software", "Merge / evaluation", "Upload"], rows)


def card_body(output: MergedOutput, evalset: EvalSet, *, model_name: str, plot_name: Optional[str]) -> str:
    method = f"[{output.method_name}]({output.method_url})" if output.method_url else output.method_name
    intro = [
        f"# {model_name}",
        "",
        f"A merge of {len(output.experts)} expert model(s)"
        + (f" into {_link(output.base)}" if output.base else "")
        + f" with {method}, made with [mergekit]({MERGEKIT_URL}) and mergekit-mllm.",
    ]
    sections = [
        intro,
        _method_section(output),
        _models_section(output),
        _policies_section(output),
        _evaluation_section(evalset, output, plot_name),
        _recipe_section(output),
        _versions_section(output, evalset),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def build_card(
    output: MergedOutput,
    evalset: EvalSet,
    *,
    model_name: str,
    license: Optional[LicenseInfo] = None,
    plot_name: Optional[str] = None,
):
    """The ``ModelCard`` for a merge; ``ModelCard.load`` parses its eval results back."""
    from huggingface_hub import ModelCard

    data = card_data(output, evalset, model_name=model_name, license=license)
    body = card_body(output, evalset, model_name=model_name, plot_name=plot_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
