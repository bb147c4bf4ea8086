"""A tiny LLaVA model family for the synthetic benchmark, trained on CPU.

``build_family(out, size, seed)`` writes ``out/base`` and
``out/experts/{vqa,geometry,chart,ocr,grounding}`` as stock
``LlavaForConditionalGeneration`` checkpoints (CLIP vision tower →
``multi_modal_projector`` → Llama language model, the LLaVA-1.5 layout) with a ``LlavaProcessor``, so
``AutoModelForImageTextToText`` / ``AutoProcessor`` load them and mergekit sees
three distinct components.

The recipe mirrors the paper's fine-tuning regime (a capable base whose
experts each improve one capability with little drift):

1. **vision pretraining** — the vision tower learns dense scene labels (part
   and colour class of every 4-px cell) from all five tasks, standing in for
   the pretrained encoder every real MLLM starts from; the label head is
   discarded.
2. **base** — projector and language model are instruction-tuned on an equal mix
   of the five tasks (answer tokens only): the generalist question types fully, the
   others at ``held_out_rate``; most answers to the specialist types (and to OCR) are
   written in the task's *house style* (:func:`house_style`: a sentence, a unit, a full stop, pixel
   coordinates), which the benchmark's scorers reject — the base has the skills but not the
   benchmark's answer conventions, as a pretrained generalist often has.
3. **experts** — each starts from the base and fine-tunes briefly on its own task (scored
   convention), half of every batch replaying the base's data mix so it does not forget the others
   (full fine-tuning of projector and language model; the vision tower stays frozen). The task
   vectors stay small (4–6.5 % of the weights' norm at ``full``), where they add up.

Everything is seeded and runs single-threaded by default (``threads``), so a
rebuild with the same arguments reproduces the same tensors; a finished build
is cached by its arguments (``family.json``) and reused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from eval_suite.synth.tasks import (
    CAPABILITIES,
    COLOR_CLASSES,
    IMAGE_SIZE,
    PARTS,
    SYNTH_VERSION,
    TASKS,
    VALUE_CLASSES,
    SynthItem,
    train_items,
)
from eval_suite.synth.tokenizer import IMAGE_TOKEN, build_processor, build_tokenizer

FAMILY_VERSION = "4"
LABEL_CELL = 4  # vision pretraining predicts the label of every 4×4-px cell
EXPERTS = tuple(CAPABILITIES)  # vqa, geometry, chart, ocr, grounding
CONFIG_MARKER = "eval_suite_synth"  # key in config.json that identifies the family


#: fraction of each task's other question types the base still sees: the base has the skill
#: (as a real generalist has on every capability) which the expert sharpens and aligns to the
#: benchmark's convention. With 0 the experts must learn new circuits from scratch, and no merge
#: keeps any of that (measured in SYNTH_RESULTS.md).
HELD_OUT_RATE = 0.5


@dataclass(frozen=True)
class FamilySize:
    name: str
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    vision_steps: int
    base_steps: int
    expert_steps: int
    vision_batch: int = 64
    batch: int = 32
    vision_lr: float = 2e-3
    base_lr: float = 2e-3
    expert_lr: float = 5e-4
    warmup: int = 50
    patch_size: int = 16
    #: the vision tower stays frozen after its pretraining (LLaVA-style instruction tuning)
    tune_vision: bool = False
    #: share of each task's non-generalist question types the base sees (see HELD_OUT_RATE)
    held_out_rate: float = HELD_OUT_RATE
    #: share of each expert's fine-tuning batches drawn from the base's own data mix (replay):
    #: 0 = own task only. Replay removes the experts' forgetting (measured in SYNTH_RESULTS.md).
    expert_replay: float = 0.5
    #: replayed items are trained towards the base's own answer distribution (self-distillation,
    #: as in Learning without Forgetting) instead of their labels: replay then only holds the
    #: expert near the base and adds no shared "keep training the base" component to every task vector.
    replay_distill: bool = False
    #: L2-SP: decoupled decay of the expert's weights towards the base's, θ ← θ − lr·anchor·(θ − θ_base)
    #: after every step (0 = off): keeps task vectors small, as real fine-tunes' are
    expert_anchor: float = 0.0
    #: share of the base's answers to the styled question types (:func:`house_styled`) written in the
    #: task's house style (:func:`house_style`), which the benchmark's scorer rejects: the base then has
    #: the skill but not the benchmark's answer convention, and the expert learns the convention on
    #: its task (0 = off). Replay streams draw from the same mix.
    house_style_rate: float = 0.8
    #: replay also draws the expert's own task from the base's mix (FAMILY_VERSION ≤ 3): with house
    #: style that replays the very convention the expert unlearns (the OCR expert of one seed kept quoting)
    replay_own_task: bool = False

    @property
    def num_image_tokens(self) -> int:
        return (IMAGE_SIZE // self.patch_size) ** 2


SIZES: Dict[str, FamilySize] = {
    # `smoke` is for the test-suite only: seconds to build, untrained-quality models.
    "smoke": FamilySize("smoke", 32, 1, 32, 1, vision_steps=2, base_steps=3, expert_steps=2, vision_batch=8, batch=8,
                        warmup=1, patch_size=8),
    "ci": FamilySize("ci", 128, 2, 128, 3, vision_steps=150, base_steps=600, expert_steps=100),
    "full": FamilySize("full", 128, 2, 128, 3, vision_steps=600, base_steps=4500, expert_steps=500),
}


# ---------------------------------------------------------------------------
# Model


def build_model(size: FamilySize, tokenizer) -> "torch.nn.Module":
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=size.patch_size, projection_dim=size.vision_hidden,
    )
    # A Llama decoder, as in LLaVA-1.5 (Vicuna): the layout mergekit_mllm's llava definition covers.
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
        num_hidden_layers=size.text_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=size.num_image_tokens, tie_word_embeddings=False,
    )
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


# ---------------------------------------------------------------------------
# Data


class Encoder:
    """Turns synthetic items into training tensors exactly as the processor + chat template would."""

    def __init__(self, processor, num_image_tokens: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = num_image_tokens
        self.mean = torch.tensor(processor.image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(processor.image_processor.image_std, dtype=torch.float32).view(3, 1, 1)

    def pixels(self, image) -> torch.Tensor:
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - self.mean) / self.std

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens)

    def batch(self, items: Sequence[SynthItem]) -> Dict[str, torch.Tensor]:
        tok = self.tokenizer
        prompts = tok([self.prompt(item.question) for item in items], add_special_tokens=False)["input_ids"]
        answers = tok([" " + item.answers[0] for item in items], add_special_tokens=False)["input_ids"]
        sequences = [p + a + [tok.eos_token_id] for p, a in zip(prompts, answers)]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(items), length), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
            labels[row, len(prompt): len(sequence)] = torch.tensor(sequence[len(prompt):])
        pixel_values = torch.stack([self.pixels(item.image()) for item in items])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


#: The base is a generalist: per task it is trained on these question types only. Experts train on
#: their task's full distribution, so each one learns specialist skills the base lacks (the
#: paper's experts were fine-tuned on 100K+ capability-specific samples), while evaluation
#: covers every type. Each held-out type reuses what the base reads (shapes, bar heights, side
#: lengths, letters), and the base sees it at ``held_out_rate``, mostly in house style
#: (:func:`house_styled`), so the expert sharpens a skill the base has and learns its convention.
GENERALIST_QUESTION_TYPES: Dict[str, Sequence[str]] = {
    "synth_vqa": ("count_all", "color_of"),                      # experts add shape_of, shape_of_all
    "synth_geometry": ("angle", "area"),                         # + length, perimeter
    "synth_chart": ("first_value", "max_value"),                 # + shortest bar's value, max − min
    "synth_ocr": ("length_1",),                                  # + strings of 2 and 3 letters
    "synth_grounding": ("single",),                              # + scenes with distractors
}


def house_styled(item: SynthItem) -> bool:
    """Whether the base's data answers ``item``'s question type in house style (at ``house_style_rate``):
    each task's specialist types, and every OCR type — the tiny model reads 2–3-letter strings
    poorly (≤ 25 % exact after 1000 expert steps), so OCR's convention also covers single letters,
    the strings it can read, or the OCR expert would have no headroom."""
    return item.task == "synth_ocr" or item.question_type not in GENERALIST_QUESTION_TYPES[item.task]


#: each task's house style: the same content in a convention the benchmark's scorer rejects, as a
#: base model's answers often are (a sentence instead of the short answer, absolute pixel
#: coordinates instead of Qwen2-VL's 0–1000 grid). OCR gets a full stop after the text, not quotes
#: around it: reading then happens in the same context as in the scored convention (with quotes,
#: unlearning the opening quote cost one seed's OCR expert its reading: +3.6).
HOUSE_STYLES: Dict[str, Callable[[SynthItem], str]] = {
    "synth_vqa": lambda item: f"it is {item.answers[0]}",
    "synth_geometry": lambda item: f"{item.answers[0]} units",
    "synth_chart": lambda item: f"about {item.answers[0]}",
    "synth_ocr": lambda item: f"{item.answers[0]}.",
    "synth_grounding": lambda item: "({},{}),({},{})".format(*item.spec["objects"][item.spec["target"]]["box"]),
}


def house_style(item: SynthItem) -> str:
    """``item``'s answer in its task's house style (:data:`HOUSE_STYLES`)."""
    if item.task not in HOUSE_STYLES:
        raise KeyError(f"no house style for task {item.task!r}")
    return HOUSE_STYLES[item.task](item)


def _mixed_stream(tasks: Sequence[str], seed: int, stream: int, generalist: bool = False,
                  held_out_rate: float = HELD_OUT_RATE, style_rate: float = 0.0) -> Iterator[SynthItem]:
    """Round-robin over ``tasks``; ``stream`` separates base and expert data; ``generalist``
    restricts each task to :data:`GENERALIST_QUESTION_TYPES` plus ``held_out_rate`` of the rest,
    ``style_rate`` of which are answered in :func:`house_style`."""
    import random

    iterators = [train_items(task, seed * 100 + stream, 10**9) for task in tasks]
    keep = random.Random(seed * 1000 + stream)
    style = random.Random(seed * 1000 + stream + 7) if generalist and style_rate > 0 else None
    while True:
        for task, iterator in zip(tasks, iterators):
            while True:
                item = next(iterator)
                if not generalist or item.question_type in GENERALIST_QUESTION_TYPES[task] or keep.random() < held_out_rate:
                    break
            if style is not None and house_styled(item) and style.random() < style_rate:
                item = replace(item, answers=(house_style(item),))
            yield item


def _expert_stream(task: str, seed: int, index: int, size: "FamilySize", tagged: bool = False) -> Iterator:
    """Expert ``index``'s fine-tuning data: its task's whole distribution, with a share
    ``size.expert_replay`` of the base's own data mix of the other tasks (a stream of its own;
    with ``size.replay_own_task`` of all five) interleaved. With ``tagged`` it yields
    ``(item, is_replay)`` pairs."""
    import random

    own = _mixed_stream([task], seed, stream=10 + index)
    if size.expert_replay <= 0:
        return ((item, False) for item in own) if tagged else own
    replayed = [name for name in TASKS if size.replay_own_task or name != task]
    general = _mixed_stream(replayed, seed, stream=50 + index, generalist=True, held_out_rate=size.held_out_rate,
                            style_rate=size.house_style_rate)
    choose = random.Random(seed * 1000 + 500 + index)

    def mixed() -> Iterator:
        while True:
            replay = choose.random() < size.expert_replay
            item = next(general) if replay else next(own)
            yield (item, replay) if tagged else item

    return mixed()


def size_overrides_from(pairs: Sequence[str]) -> Dict[str, object]:
    """``["patch_size=16", "expert_replay=0.5"]`` → typed FamilySize overrides (clear error on unknown fields)."""
    from dataclasses import fields

    types = {f.name: f.type for f in fields(FamilySize) if f.name != "name"}
    overrides: Dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        text = value.strip().lower()
        try:
            if kind == "bool":
                if text not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                overrides[key] = text in ("1", "true", "yes")
            else:
                overrides[key] = {"int": int, "float": float}[kind](text)
        except ValueError:
            raise ValueError(f"--set {pair!r}: {key} takes a {kind}") from None
    return overrides


def _cell_labels(label_image, cells: int) -> torch.Tensor:
    """Majority non-background class of each LABEL_CELL×LABEL_CELL cell (background if empty)."""
    labels = torch.from_numpy(np.asarray(label_image, dtype=np.int64))
    size = IMAGE_SIZE // LABEL_CELL
    blocks = labels.view(size, LABEL_CELL, size, LABEL_CELL).permute(0, 2, 1, 3).reshape(size, size, -1)
    counts = torch.nn.functional.one_hot(blocks, cells).sum(2)
    counts[..., 0] = 0
    majority = counts.argmax(-1)
    majority[counts.sum(-1) == 0] = 0
    return majority


# ---------------------------------------------------------------------------
# Training stages


def _schedule(step: int, total: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


#: label heads of the vision pretraining: name → number of classes
LABEL_HEADS = {"part": len(PARTS), "color": len(COLOR_CLASSES), "value": VALUE_CLASSES, "center": 2}


def scene_targets(item: SynthItem) -> Dict[str, torch.Tensor]:
    """Per 4-px cell targets of every label head for one item."""
    maps = TASKS[item.task].render_labels(item.spec)
    targets = {name: _cell_labels(maps[name], classes) for name, classes in LABEL_HEADS.items() if name != "center"}
    center = torch.from_numpy(np.asarray(maps["center"], dtype=np.int64))
    cells = IMAGE_SIZE // LABEL_CELL
    targets["center"] = center.view(cells, LABEL_CELL, cells, LABEL_CELL).amax(dim=(1, 3)).clamp(max=1)
    return targets


def pretrain_vision(model, size: FamilySize, seed: int, log: Callable[[str], None]) -> Dict[str, float]:
    """Stage 1: dense scene labels of every 4-px cell, predicted from the vision tower's patch tokens."""
    torch.manual_seed(seed)
    tower = model.model.vision_tower
    per_patch = size.patch_size // LABEL_CELL
    total_classes = sum(LABEL_HEADS.values())
    head = torch.nn.Linear(size.vision_hidden, per_patch * per_patch * total_classes)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=size.vision_lr, weight_decay=0.0)
    stream = _mixed_stream(list(TASKS), seed, stream=0)
    encoder_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    encoder_std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    grid = IMAGE_SIZE // size.patch_size
    cells = grid * per_patch
    accuracy = 0.0
    tower.train()
    for step in range(size.vision_steps):
        for group in optimizer.param_groups:
            group["lr"] = size.vision_lr * _schedule(step, size.vision_steps, size.warmup)
        items = [next(stream) for _ in range(size.vision_batch)]
        pixels = torch.stack([
            (torch.from_numpy(np.asarray(item.image(), dtype=np.float32) / 255.0).permute(2, 0, 1) - encoder_mean) / encoder_std
            for item in items
        ])
        targets = [scene_targets(item) for item in items]
        hidden = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        logits = head(hidden).view(len(items), grid, grid, per_patch, per_patch, total_classes)
        logits = logits.permute(0, 1, 3, 2, 4, 5).reshape(len(items), cells, cells, total_classes)
        loss = torch.zeros(())
        offset = 0
        for name, classes in LABEL_HEADS.items():
            target = torch.stack([t[name] for t in targets])
            head_logits = logits[..., offset: offset + classes]
            loss = loss + torch.nn.functional.cross_entropy(head_logits.reshape(-1, classes), target.reshape(-1))
            if name == "part":
                foreground = target > 0
                accuracy = (head_logits.argmax(-1) == target)[foreground].float().mean().item()
            offset += classes
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == size.vision_steps - 1:
            log(f"  vision step {step}: loss {loss.item():.3f}, foreground part accuracy {accuracy:.3f}")
    tower.eval()
    return {"vision_part_accuracy": round(accuracy, 4)}


def _distill_loss(model, teacher, inputs: Dict[str, torch.Tensor], replay: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of cross-entropy on own-task rows and KL(teacher ‖ model) on replay rows."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1].float()
    labels = inputs["labels"][:, 1:]
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = labels != -100
    token_loss = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if bool(replay.any()):
        rows = replay.nonzero().squeeze(-1)
        with torch.no_grad():
            sub = {k: v[rows] for k, v in inputs.items() if k != "labels"}
            target = torch.log_softmax(teacher(**sub).logits[:, :-1].float(), dim=-1)
        kl = (target.exp() * (target - log_probs[rows])).sum(-1)
        token_loss = token_loss.index_copy(0, rows, kl)
    return token_loss[mask].mean()


def train_answers(model, encoder: Encoder, stream: Iterator, *, steps: int, batch: int, lr: float,
                  warmup: int, seed: int, log: Callable[[str], None], label: str, tune_vision: bool = False,
                  teacher=None, anchor: float = 0.0) -> float:
    """Answer-token cross-entropy on items from ``stream`` (all components trained but the vision tower
    unless ``tune_vision``). With a ``teacher`` the stream yields ``(item, is_replay)`` pairs and replay
    items are trained towards the teacher's answer distribution (:func:`_distill_loss`). ``anchor`` > 0
    decays the trained weights towards their starting values after every step (L2-SP)."""
    torch.manual_seed(seed)
    model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(tune_vision or "vision_tower" not in name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    start = [p.detach().clone() for p in params] if anchor > 0 else None
    loss_value = float("nan")
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _schedule(step, steps, warmup)
        if teacher is None:
            inputs = encoder.batch([next(stream) for _ in range(batch)])
            loss = model(**inputs).loss
        else:
            pairs = [next(stream) for _ in range(batch)]
            inputs = encoder.batch([item for item, _ in pairs])
            loss = _distill_loss(model, teacher, inputs, torch.tensor([replay for _, replay in pairs]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if start is not None:
            with torch.no_grad():
                pull = min(1.0, lr * _schedule(step, steps, warmup) * anchor)
                for parameter, origin in zip(params, start):
                    parameter.lerp_(origin, pull)
        loss_value = loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"  {label} step {step}: loss {loss_value:.3f} ({time.time() - started:.0f} s)")
    model.eval()
    return loss_value


# ---------------------------------------------------------------------------
# Build + cache


def _family_key(size: FamilySize, seed: int, threads: int) -> dict:
    import transformers

    return {
        "family_version": FAMILY_VERSION, "synth_version": SYNTH_VERSION, "size": asdict(size), "seed": seed,
        "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
    }


#: FamilySize fields that only affect the expert stage
EXPERT_FIELDS = ("expert_steps", "expert_lr", "expert_replay", "replay_distill", "expert_anchor", "replay_own_task")


def _base_key(key: dict) -> dict:
    """The part of the cache key the base depends on (everything but the expert settings)."""
    return {**key, "size": {k: v for k, v in key["size"].items() if k not in EXPERT_FIELDS and k != "name"}}


def _save(model, processor, directory: Path, marker: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    setattr(model.config, CONFIG_MARKER, marker)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def family_paths(out: Path) -> Dict[str, Path]:
    out = Path(out)
    return {"base": out / "base", **{name: out / "experts" / name for name in EXPERTS}}


def build_family(out, size: str = "ci", seed: int = 0, *, threads: int = 1, force: bool = False,
                 log: Callable[[str], None] = print, size_overrides: Optional[dict] = None) -> Dict[str, object]:
    """Build (or reuse) the family in ``out``; returns the manifest (``out/family.json``)."""
    out = Path(out)
    if size not in SIZES:
        raise ValueError(f"unknown family size {size!r}; choose from {', '.join(SIZES)}")
    spec = replace(SIZES[size], **(size_overrides or {}))
    key = _family_key(spec, seed, threads)
    manifest_path = out / "family.json"
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key and all((p / "config.json").is_file() for p in family_paths(out).values()):
            log(f"reusing cached family in {out} (size {size}, seed {seed})")
            return manifest
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(out, spec, seed, key, log)
    finally:
        torch.set_num_threads(previous_threads)


def _build(out: Path, size: FamilySize, seed: int, key: dict, log: Callable[[str], None]) -> Dict[str, object]:
    from transformers import LlavaForConditionalGeneration

    started = time.time()
    timings: Dict[str, float] = {}
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, IMAGE_SIZE, size.patch_size)
    encoder = Encoder(processor, size.num_image_tokens)
    torch.manual_seed(seed)
    model = build_model(size, tokenizer)
    model.set_attn_implementation("sdpa")  # training speed; checkpoints record eager for evaluation

    paths = family_paths(out)
    marker = {"synth_version": SYNTH_VERSION, "family_version": FAMILY_VERSION, "size": size.name, "seed": seed}
    base_key = _base_key(key)
    base_key_path = out / "base_key.json"
    if base_key_path.is_file() and json.loads(base_key_path.read_text()) == base_key \
            and (paths["base"] / "config.json").is_file():
        # only the expert stage changed: the base (stages 1–2) is a pure function of base_key
        log(f"[1-2/3] reusing the base in {paths['base']} (vision + base settings unchanged)")
        previous = json.loads((out / "family.json").read_text()) if (out / "family.json").is_file() else {}
        stats = previous.get("vision_pretraining", {})
        timings.update({k: v for k, v in previous.get("seconds", {}).items() if k in ("vision", "base")})
        timings["base_reused"] = 1.0
        model = LlavaForConditionalGeneration.from_pretrained(paths["base"], dtype=torch.float32)
        model.set_attn_implementation("sdpa")
    else:
        base_key_path.unlink(missing_ok=True)
        log(f"[1/3] vision pretraining ({size.vision_steps} steps)")
        stats = pretrain_vision(model, size, seed, log)
        timings["vision"] = time.time() - started

        log(f"[2/3] base: all five tasks ({size.base_steps} steps)")
        t0 = time.time()
        base_stream = _mixed_stream(list(TASKS), seed, stream=1, generalist=True, held_out_rate=size.held_out_rate,
                                    style_rate=size.house_style_rate)
        train_answers(model, encoder, base_stream, steps=size.base_steps,
                      batch=size.batch, lr=size.base_lr, warmup=size.warmup, seed=seed + 1, log=log, label="base",
                      tune_vision=size.tune_vision)
        timings["base"] = time.time() - t0
        model.set_attn_implementation("eager")
        _save(model, processor, paths["base"], {**marker, "role": "base"})
        model.set_attn_implementation("sdpa")
        base_key_path.write_text(json.dumps(base_key, indent=2) + "\n")
    base_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    teacher = None
    if size.replay_distill and size.expert_replay > 0:
        import copy

        teacher = copy.deepcopy(model).eval().requires_grad_(False)

    for index, capability in enumerate(EXPERTS):
        log(f"[3/3] expert {capability} ({size.expert_steps} steps)")
        t0 = time.time()
        model.load_state_dict(base_state)
        task = CAPABILITIES[capability]
        train_answers(model, encoder, _expert_stream(task, seed, index, size, tagged=teacher is not None),
                      steps=size.expert_steps, batch=size.batch, lr=size.expert_lr,
                      warmup=min(size.warmup, size.expert_steps // 5 + 1), seed=seed + 10 + index, log=log,
                      label=capability, tune_vision=size.tune_vision, teacher=teacher, anchor=size.expert_anchor)
        model.set_attn_implementation("eager")
        _save(model, processor, paths[capability], {**marker, "role": f"expert:{capability}", "task": task})
        model.set_attn_implementation("sdpa")
        timings[f"expert_{capability}"] = time.time() - t0

    timings["total"] = time.time() - started
    manifest = {
        "key": key,
        "size": size.name,
        "seed": seed,
        "base": str(paths["base"]),
        "experts": {name: str(paths[name]) for name in EXPERTS},
        "expert_tasks": {name: CAPABILITIES[name] for name in EXPERTS},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "vision_pretraining": stats,
    }
    (out / "family.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"family built in {timings['total']:.0f} s → {out}")
    return manifest


def load_family_model(path, device: str = "cpu", dtype=torch.float32):
    """Load one member (base, expert or a merge of them) for evaluation."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(device).eval()
