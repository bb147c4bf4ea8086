"""Regenerate the architecture data files from tiny transformers models.

    python -m mergekit_mllm.architectures.generate [--check]

For every family and key layout in :data:`SPECS`, a tiny model is built with
:mod:`mergekit_mllm.testing.vlm`, its checkpoint's tensor names are grouped
into mergekit modules by the family's component prefixes, each module's
repeated block becomes a ``${layer_index}`` template counted by a config key,
and the result is written to ``data/<family>[.<layout>].json`` in mergekit's
"modular" JSON format. Every weight is ``optional`` so that one definition
covers config variants (tied or untied ``lm_head``, optional biases, …); the
completeness guard checks the other direction (no input tensor left out).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

DATA = Path(__file__).parent / "data"

# mergekit module name -> component role used by the policies
MODULE_ROLES = {
    "vision_tower": "vision_tower",
    "multi_modal_projector": "projector",
    "language_model": "language_model",
}


@dataclass(frozen=True)
class Stack:
    """A repeated block: tensors ``<prefix><i>.<rest>`` for i < config[key]."""

    prefix: str
    config_key: str


@dataclass(frozen=True)
class Layout:
    name: str
    # module -> prefixes (checked projector first, then vision tower, then LM)
    prefixes: Dict[str, Tuple[str, ...]]
    stacks: Dict[str, Stack]
    embed_tokens: str
    lm_head: str
    # Optional extras not in the tiny model, e.g. deepstack mergers 0..7.
    extra: Tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    family: str
    architectures: Tuple[str, ...]
    model_type: str
    layouts: Tuple[Layout, ...]
    tagalong_files: Tuple[str, ...] = ()
    builder_layouts: Dict[str, str] = field(default_factory=dict)  # layout name -> testing.vlm layout


def _qwen_vl_layouts(text_layers: str, vision_key: str) -> Tuple[Layout, ...]:
    legacy = Layout(
        "legacy",
        {"multi_modal_projector": ("visual.merger.",), "vision_tower": ("visual.",),
         "language_model": ("model.", "lm_head.")},
        {"language_model": Stack("model.layers.", text_layers), "vision_tower": Stack("visual.blocks.", vision_key)},
        "model.embed_tokens.weight", "lm_head.weight",
    )
    new = Layout(
        "new",
        {"multi_modal_projector": ("model.visual.merger.",), "vision_tower": ("model.visual.",),
         "language_model": ("model.language_model.", "lm_head.")},
        {"language_model": Stack("model.language_model.layers.", text_layers),
         "vision_tower": Stack("model.visual.blocks.", vision_key)},
        "model.language_model.embed_tokens.weight", "lm_head.weight",
    )
    return legacy, new


def _llava_like_layouts(vision_stack: str, vision_key: str, extra_projector: Tuple[str, ...] = ()) -> Tuple[Layout, ...]:
    legacy = Layout(
        "legacy",
        {"multi_modal_projector": ("multi_modal_projector.",) + extra_projector, "vision_tower": ("vision_tower.",),
         "language_model": ("language_model.",)},
        {"language_model": Stack("language_model.model.layers.", "text_config.num_hidden_layers"),
         "vision_tower": Stack("vision_tower." + vision_stack, vision_key)},
        "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
    )
    new = Layout(
        "new",
        {"multi_modal_projector": ("model.multi_modal_projector.",) + tuple("model." + p for p in extra_projector),
         "vision_tower": ("model.vision_tower.",), "language_model": ("model.language_model.", "lm_head.")},
        {"language_model": Stack("model.language_model.layers.", "text_config.num_hidden_layers"),
         "vision_tower": Stack("model.vision_tower." + vision_stack, vision_key)},
        "model.language_model.embed_tokens.weight", "lm_head.weight",
    )
    return legacy, new


_IDEFICS = Layout(
    "legacy",
    {"multi_modal_projector": ("model.connector.",), "vision_tower": ("model.vision_model.",),
     "language_model": ("model.text_model.", "lm_head.")},
    {"language_model": Stack("model.text_model.layers.", "text_config.num_hidden_layers"),
     "vision_tower": Stack("model.vision_model.encoder.layers.", "vision_config.num_hidden_layers")},
    "model.text_model.embed_tokens.weight", "lm_head.weight",
)

SPECS: Tuple[FamilySpec, ...] = (
    FamilySpec("qwen2_vl", ("Qwen2VLForConditionalGeneration",), "qwen2_vl",
               _qwen_vl_layouts("text_config.num_hidden_layers", "vision_config.depth")),
    FamilySpec("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), "qwen2_5_vl",
               _qwen_vl_layouts("text_config.num_hidden_layers", "vision_config.depth")),
    FamilySpec(
        "qwen3_vl", ("Qwen3VLForConditionalGeneration",), "qwen3_vl",
        (Layout(
            "new",
            {"multi_modal_projector": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
             "vision_tower": ("model.visual.",), "language_model": ("model.language_model.", "lm_head.")},
            {"language_model": Stack("model.language_model.layers.", "text_config.num_hidden_layers"),
             "vision_tower": Stack("model.visual.blocks.", "vision_config.depth")},
            "model.language_model.embed_tokens.weight", "lm_head.weight",
            # deepstack mergers: one per deepstack index (3 in the released models)
            extra=tuple(
                f"model.visual.deepstack_merger_list.{i}.{part}"
                for i in range(8)
                for part in ("norm.weight", "norm.bias", "linear_fc1.weight", "linear_fc1.bias",
                             "linear_fc2.weight", "linear_fc2.bias")
            ),
        ),),
        builder_layouts={"new": "legacy"},
    ),
    FamilySpec(
        "internvl_chat", ("InternVLChatModel",), "internvl_chat",
        (Layout(
            "legacy",
            {"multi_modal_projector": ("mlp1.",), "vision_tower": ("vision_model.",),
             "language_model": ("language_model.",)},
            {"language_model": Stack("language_model.model.layers.", "llm_config.num_hidden_layers"),
             "vision_tower": Stack("vision_model.encoder.layers.", "vision_config.num_hidden_layers")},
            "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
        ),),
    ),
    FamilySpec("internvl", ("InternVLForConditionalGeneration",), "internvl",
               _llava_like_layouts("encoder.layer.", "vision_config.num_hidden_layers")),
    FamilySpec("llava", ("LlavaForConditionalGeneration",), "llava",
               _llava_like_layouts("vision_model.encoder.layers.", "vision_config.num_hidden_layers")),
    FamilySpec("llava_onevision", ("LlavaOnevisionForConditionalGeneration",), "llava_onevision",
               _llava_like_layouts("vision_model.encoder.layers.", "vision_config.num_hidden_layers",
                                   extra_projector=("image_newline",))),
    FamilySpec("idefics3", ("Idefics3ForConditionalGeneration",), "idefics3", (_IDEFICS,)),
    FamilySpec("smolvlm", ("SmolVLMForConditionalGeneration",), "smolvlm", (_IDEFICS,)),
    FamilySpec("gemma3", ("Gemma3ForConditionalGeneration",), "gemma3",
               _llava_like_layouts("vision_model.encoder.layers.", "vision_config.num_hidden_layers")),
    FamilySpec(
        "qwen2_audio", ("Qwen2AudioForConditionalGeneration",), "qwen2_audio",
        (
            Layout(
                "legacy",
                {"multi_modal_projector": ("multi_modal_projector.",), "vision_tower": ("audio_tower.",),
                 "language_model": ("language_model.",)},
                {"language_model": Stack("language_model.model.layers.", "text_config.num_hidden_layers"),
                 "vision_tower": Stack("audio_tower.layers.", "audio_config.encoder_layers")},
                "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
            ),
            Layout(
                "new",
                {"multi_modal_projector": ("model.multi_modal_projector.",), "vision_tower": ("model.audio_tower.",),
                 "language_model": ("model.language_model.", "lm_head.")},
                {"language_model": Stack("model.language_model.layers.", "text_config.num_hidden_layers"),
                 "vision_tower": Stack("model.audio_tower.layers.", "audio_config.encoder_layers")},
                "model.language_model.embed_tokens.weight", "lm_head.weight",
            ),
        ),
    ),
)

_POST_SUFFIXES = ("norm.weight", "norm.bias")


def _module_of(name: str, layout: Layout) -> str:
    for module in ("multi_modal_projector", "vision_tower", "language_model"):
        if any(name.startswith(prefix) for prefix in layout.prefixes.get(module, ())):
            return module
    raise ValueError(f"tensor {name} matches no component prefix of layout {layout.name}")


def _weight(name: str, layout: Layout) -> dict:
    weight = {"name": name, "optional": True}
    if name in (layout.embed_tokens, layout.lm_head):
        weight["vocabulary_axis"] = 0
    if name == layout.lm_head:
        weight["tied_names"] = [layout.embed_tokens]
    return weight


def definition_for(spec: FamilySpec, layout: Layout, tensor_names: List[str]) -> dict:
    names = sorted(set(tensor_names) | {layout.embed_tokens, layout.lm_head} | set(layout.extra), key=_natural)
    grouped: Dict[str, Dict[str, list]] = {m: {"pre": [], "layer": [], "post": []} for m in MODULE_ROLES}
    for name in names:
        module = _module_of(name, layout)
        stack = layout.stacks.get(module)
        match = re.match(re.escape(stack.prefix) + r"(\d+)\.(.+)$", name) if stack else None
        if match:
            template = f"{stack.prefix}${{layer_index}}.{match.group(2)}"
            if template not in grouped[module]["layer"]:
                grouped[module]["layer"].append(template)
        elif module == "language_model" and (name == layout.lm_head or
                                             (name.endswith(_POST_SUFFIXES) and "layers" not in name)):
            grouped[module]["post"].append(name)
        else:
            grouped[module]["pre"].append(name)
    modules = {}
    for module, parts in grouped.items():
        if not any(parts.values()):
            continue
        stack = layout.stacks.get(module)
        architecture = {
            "model_type": "",
            "architectures": [],
            "pre_weights": [_weight(n, layout) for n in parts["pre"]],
            "layer_templates": {"weights": [_weight(n, layout) for n in parts["layer"]]},
            "post_weights": [_weight(n, layout) for n in parts["post"]],
        }
        if parts["layer"]:
            architecture["num_layers_config_key"] = stack.config_key
        else:
            architecture["override_num_layers"] = 0
        modules[module] = {"architecture": architecture}
    definition = {
        "kind": "modular",
        "model_type": spec.model_type,
        "architectures": list(spec.architectures),
        "modules": modules,
        "mergekit_mllm": {
            "family": spec.family,
            "layout": layout.name,
            "module_roles": {m: MODULE_ROLES[m] for m in modules},
            "generated_by": "python -m mergekit_mllm.architectures.generate",
        },
    }
    if spec.tagalong_files:
        definition["tagalong_files"] = list(spec.tagalong_files)
    return definition


def _natural(value: str):
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", value))


def file_name(spec: FamilySpec, layout: Layout) -> str:
    return f"{spec.family}.json" if len(spec.layouts) == 1 else f"{spec.family}.{layout.name}.json"


def generate() -> Dict[str, dict]:
    from mergekit_mllm.testing import state_dict
    from mergekit_mllm.testing.vlm import build_vlm

    outputs = {}
    for spec in SPECS:
        for layout in spec.layouts:
            with tempfile.TemporaryDirectory() as tmp:
                build_vlm(spec.family, Path(tmp), layout=spec.builder_layouts.get(layout.name, layout.name))
                names = list(state_dict(Path(tmp)))
            outputs[file_name(spec, layout)] = definition_for(spec, layout, names)
    return outputs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the data files are out of date")
    args = parser.parse_args(argv)
    outputs = generate()
    stale = []
    for name, definition in outputs.items():
        text = json.dumps(definition, indent=2) + "\n"
        path = DATA / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if args.check and stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    print(f"{len(outputs)} architecture definitions {'checked' if args.check else 'written'} in {DATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
