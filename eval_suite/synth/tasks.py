"""Five procedurally generated tasks mirroring the paper's capabilities.

Every item is a pure function of ``(task, split, seed, index)``: a scene
*spec* (plain JSON) is drawn from a seeded ``random.Random`` and rendered with
PIL without anti-aliasing, so the same arguments give the same pixels.

Splits: ``val`` and ``test`` are frozen (fixed seeds, independent of any model
family's seed; :data:`EVAL_SPLIT_SEEDS`); ``train`` items come from the family
seed and skip any item whose canonical key occurs in a frozen split.
A λ sweep selects on ``val``; final numbers are reported on ``test``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from eval_suite.synth.font import GLYPH_WIDTH, draw_text, text_size

#: bump when a generator or renderer changes; results record it as the dataset revision
SYNTH_VERSION = "4"
IMAGE_SIZE = 64
EVAL_SPLIT_SEEDS = {"val": 1_000_003, "test": 2_000_003}
EVAL_SPLIT_SIZE = 500

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID = 4  # object positions snap to a 4-px grid
GROUNDING_GRID = 8
OCR_ALPHABET = "ABCDEFHKLMNPRTUX"  # letters that stay distinct at 5×7
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "


@dataclass(frozen=True)
class SynthItem:
    task: str
    split: str
    index: int
    question: str
    answers: Tuple[str, ...]
    question_type: str
    spec: dict = field(hash=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.task}/{self.split}/{self.index}"

    def image(self) -> Image.Image:
        return TASKS[self.task].render(self.spec)

    def key(self) -> str:
        """Canonical identity (spec + question) used to keep train items out of eval splits."""
        return item_key(self.spec, self.question)


def item_key(spec: dict, question: str) -> str:
    payload = json.dumps({"spec": spec, "question": question}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _rng(task: str, split: str, seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{SYNTH_VERSION}:{task}:{split}:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------
# Shared scene helpers


def _place_boxes(rng: random.Random, sizes: Sequence[int], margin: int = 2, grid: int = GRID) -> List[List[int]]:
    """Non-overlapping axis-aligned boxes [x0, y0, x1, y1) on the GRID lattice, in ``sizes`` order.

    Rejection sampling; a dead end restarts the whole layout (deterministic for a given ``rng``).
    """
    for _ in range(100):
        boxes: List[List[int]] = []
        for size in sizes:
            for _ in range(50):
                x0 = rng.randrange(0, (IMAGE_SIZE - size) // grid + 1) * grid
                y0 = rng.randrange(0, (IMAGE_SIZE - size) // grid + 1) * grid
                box = [x0, y0, x0 + size, y0 + size]
                if all(_separated(box, other, margin) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    raise RuntimeError(f"could not place objects of sizes {list(sizes)}")  # pragma: no cover


def _separated(a, b, margin) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _draw_object(draw: ImageDraw.ImageDraw, paint: "Painter", shape: str, color: str, box: Sequence[int]) -> None:
    x0, y0, x1, y1 = box
    if paint.mode == "center":
        draw.point([((x0 + x1) // 2, (y0 + y1) // 2)], fill=1)
        return
    fill = paint(shape, color)
    if fill is None:
        return
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


# Dense scene labels: every pixel gets a *part* class and a *colour* class. The
# family builder pretrains the vision tower on them (real MLLMs start from a
# pretrained vision encoder); evaluation never uses them.
PARTS = ("background", "circle", "square", "triangle", "line", "grid", "rectangle", "bar", "axis") + tuple(
    f"char_{c}" for c in OCR_ALPHABET
)
PART_IDS = {name: i for i, name in enumerate(PARTS)}
COLOR_CLASSES = ("white",) + tuple(COLORS) + ("ink", "grey")
COLOR_IDS = {name: i for i, name in enumerate(COLOR_CLASSES)}
INKS = {"black": (0, 0, 0), "navy": (40, 40, 140), "maroon": (120, 20, 20)}
GREY = (200, 200, 200)


class Painter:
    """Maps a drawn element to a fill: RGB for the image, class ids for the label maps.

    Label modes (images of mode "L"): ``part`` (what the pixel belongs to),
    ``color``, ``value`` (the element's task quantity: a bar's value/10, a ray's
    angle class, a segment's length, a rectangle's area, a character's position
    in its string) and ``center`` (1 at object centres; used for counting).
    ``None`` means "do not draw this element in this mode".
    """

    MODES = ("rgb", "part", "color", "value", "center")

    def __init__(self, mode: str):
        if mode not in self.MODES:
            raise ValueError(mode)
        self.mode = mode

    @property
    def image_mode(self) -> str:
        return "RGB" if self.mode == "rgb" else "L"

    @property
    def background(self):
        return WHITE if self.mode == "rgb" else 0

    def __call__(self, part: str, color: str, value: int = 0):
        if self.mode == "part":
            return PART_IDS[part]
        if self.mode == "color":
            return COLOR_IDS["ink" if color in INKS else color]
        if self.mode == "value":
            return value or None
        if self.mode == "center":
            return None
        if color in COLORS:
            return COLORS[color]
        if color in INKS:
            return INKS[color]
        return GREY if color == "grey" else BLACK


VALUE_CLASSES = 17  # 0 = none; bars 1–9, angles 1–3, lengths 1–7, areas 1–16, string positions 1–3


def _canvas(paint: Painter) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new(paint.image_mode, (IMAGE_SIZE, IMAGE_SIZE), paint.background)
    return image, ImageDraw.Draw(image)


def _draw_objects(spec: dict, paint: Painter) -> Image.Image:
    image, draw = _canvas(paint)
    for obj in spec["objects"]:
        _draw_object(draw, paint, obj["shape"], obj["color"], obj["box"])
    return image


# ---------------------------------------------------------------------------
# synth_vqa: counting, colour and shape questions


def _gen_vqa(rng: random.Random):
    # No question binds a word to one object among several (a colour word to a shape, or counting
    # the objects of one shape): the tiny family's tower + LM never learnt that (SYNTH_RESULTS.md,
    # SYNTH_VERSION 3 probes). Colour and shape are asked of a lone object or of objects that all
    # share it; counts are of whole scenes.
    kind = rng.choice(["count_all", "color_of", "shape_of", "shape_of_all"])
    count = {"color_of": 1, "shape_of": 1, "shape_of_all": rng.randint(2, 4)}.get(kind, rng.randint(1, 5))
    shared = rng.choice(SHAPES)
    objects = [
        {"shape": shared if kind == "shape_of_all" else rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "box": box}
        for box in _place_boxes(rng, [rng.choice([10, 12, 14]) for _ in range(count)])
    ]
    spec = {"objects": objects}
    if kind == "count_all":
        return spec, "how many objects are there?", str(count), kind
    if kind == "color_of":
        return spec, "what color is the object?", objects[0]["color"], kind
    if kind == "shape_of":
        return spec, "what shape is the object?", objects[0]["shape"], kind
    return spec, "what shape are the objects?", shared, kind


# ---------------------------------------------------------------------------
# synth_geometry: angles, lengths and areas in rendered figures

ANGLES = (45, 90, 135)  # three classes: finer ones stayed at chance (SYNTH_VERSION 3)
UNIT = 8  # grid unit in pixels


def _gen_geometry(rng: random.Random):
    kind = rng.choice(["angle", "length", "area", "perimeter"])
    if kind == "angle":
        angle = rng.choice(ANGLES)
        spec = {
            "kind": kind,
            "vertex": [rng.randint(20, 44), rng.randint(20, 44)],
            "start": rng.randrange(0, 360, 15),
            "angle": angle,
            "arms": [rng.randint(18, 22), rng.randint(18, 22)],
        }
        return spec, "what is the size of the angle in degrees?", str(angle), kind
    if kind == "length":
        length = rng.randint(1, 7)
        horizontal = rng.random() < 0.5
        start = [rng.randint(0, 7 - length), rng.randint(1, 7)]
        if not horizontal:
            start.reverse()
        spec = {"kind": kind, "start": start, "length": length, "horizontal": horizontal}
        return spec, "how many grid units long is the red segment?", str(length), kind
    width, height = rng.randint(1, 4), rng.randint(1, 4)
    corner = [rng.randint(0, 7 - width), rng.randint(0, 7 - height)]
    spec = {"kind": "area", "corner": corner, "size": [width, height]}  # the same figure for both questions
    if kind == "perimeter":  # needs the two sides, not the labelled area: arithmetic on top of reading
        return spec, "what is the perimeter of the blue rectangle in grid units?", str(2 * (width + height)), kind
    return spec, "what is the area of the blue rectangle in grid units?", str(width * height), kind


def _draw_grid(draw: ImageDraw.ImageDraw, paint: Painter) -> None:
    fill = paint("grid", "grey")
    if fill is None:
        return
    for k in range(0, IMAGE_SIZE + 1, UNIT):
        edge = min(k, IMAGE_SIZE - 1)
        draw.line([(edge, 0), (edge, IMAGE_SIZE - 1)], fill=fill)
        draw.line([(0, edge), (IMAGE_SIZE - 1, edge)], fill=fill)


def _draw_geometry(spec: dict, paint: Painter) -> Image.Image:
    image, draw = _canvas(paint)
    if spec["kind"] == "angle":
        vx, vy = spec["vertex"]
        for arm, direction in zip(spec["arms"], (spec["start"], spec["start"] + spec["angle"])):
            radians = math.radians(direction)
            end = (round(vx + arm * math.cos(radians)), round(vy - arm * math.sin(radians)))
            fill = paint("line", "black", ANGLES.index(spec["angle"]) + 1)
            if fill is not None:
                draw.line([(vx, vy), end], fill=fill, width=2)
        return image
    _draw_grid(draw, paint)
    if spec["kind"] == "length":
        x, y = spec["start"]
        dx, dy = (spec["length"], 0) if spec["horizontal"] else (0, spec["length"])
        fill = paint("line", "red", spec["length"])
        if fill is not None:
            draw.line([(x * UNIT, y * UNIT), ((x + dx) * UNIT, (y + dy) * UNIT)], fill=fill, width=3)
        return image
    (x, y), (w, h) = spec["corner"], spec["size"]
    fill = paint("rectangle", "blue", w * h)
    if fill is not None:
        draw.rectangle([x * UNIT + 1, y * UNIT + 1, (x + w) * UNIT - 1, (y + h) * UNIT - 1], fill=fill)
    return image


# ---------------------------------------------------------------------------
# synth_chart: values read off rendered bar charts (relaxed accuracy)

CHART_BASELINE = 60
CHART_SCALE = 0.4  # pixels per unit: values 10, 20, …, 90 give bars 4–36 px high, on the 4-px lattice
BAR_PITCH, BAR_WIDTH = 12, 8


def _gen_chart(rng: random.Random):
    count = rng.randint(3, 5)
    colors = rng.sample(list(COLORS), count)
    values = rng.sample(range(10, 100, 10), count)
    spec = {"colors": colors, "values": values}
    # Bars are read by position or extremum, not by colour word (binding stayed at chance, v3).
    kind = rng.choice(["first_value", "max_value", "min_value", "range"])
    if kind == "first_value":
        return spec, "what is the value of the first bar?", str(values[0]), kind
    if kind == "max_value":
        return spec, "what is the value of the tallest bar?", str(max(values)), kind
    if kind == "min_value":
        return spec, "what is the value of the shortest bar?", str(min(values)), kind
    # two readings and a subtraction (as perimeter is two readings and arithmetic)
    return spec, "what is the difference between the tallest and the shortest bar?", str(max(values) - min(values)), kind


def _draw_chart(spec: dict, paint: Painter) -> Image.Image:
    image, draw = _canvas(paint)
    axis = paint("axis", "black")
    if axis is not None:
        draw.line([(2, 16), (2, CHART_BASELINE)], fill=axis)
        draw.line([(2, CHART_BASELINE), (IMAGE_SIZE - 1, CHART_BASELINE)], fill=axis)
        for tick in (0, 50, 100):
            y = CHART_BASELINE - round(tick * CHART_SCALE)
            draw.line([(0, y), (2, y)], fill=axis)
    for i, (color, value) in enumerate(zip(spec["colors"], spec["values"])):
        x0 = 4 + i * BAR_PITCH
        top = CHART_BASELINE - round(value * CHART_SCALE)
        fill = paint("bar", color, value // 10)
        if fill is not None:
            draw.rectangle([x0, top, x0 + BAR_WIDTH - 1, CHART_BASELINE - 1], fill=fill)
    return image


# ---------------------------------------------------------------------------
# synth_ocr: rendered strings (exact match and ANLS)


def _gen_ocr(rng: random.Random):
    length = rng.randint(1, 3)  # 3–5 letters: exact match 0 in every model (v3)
    text = "".join(rng.choice(OCR_ALPHABET) for _ in range(length))
    width, height = text_size(text, scale=2, spacing=1)
    spec = {
        "text": text,
        # on the 4-px lattice: each character (12-px pitch) covers exactly three 4-px columns
        "xy": [rng.randrange(0, IMAGE_SIZE - width + 1, 4), rng.randrange(0, IMAGE_SIZE - height + 1, 4)],
        "ink": rng.choice(list(INKS)),
    }
    return spec, "what is the text in the image?", text, f"length_{length}"


def _draw_ocr(spec: dict, paint: Painter) -> Image.Image:
    image, draw = _canvas(paint)
    x, y = spec["xy"]
    for position, char in enumerate(spec["text"]):
        left = x + position * (GLYPH_WIDTH + 1) * 2
        fill = paint(f"char_{char}", spec["ink"], position + 1)
        if fill is not None:
            draw_text(draw, (left, y), char, fill=fill, scale=2, spacing=1)
    return image


# ---------------------------------------------------------------------------
# synth_grounding: the box of a described object, Qwen2-VL 0–1000 format


def format_box_qwen2_vl(box_pixels: Sequence[float], width: int = IMAGE_SIZE, height: int = IMAGE_SIZE) -> str:
    """``(x1,y1),(x2,y2)`` on the 0–1000 relative grid; ⌊v·1000⌋ like the experts' training data."""
    x0, y0, x1, y1 = box_pixels
    values = [math.floor(x0 / width * 1000), math.floor(y0 / height * 1000),
              math.floor(x1 / width * 1000), math.floor(y1 / height * 1000)]
    return "({},{}),({},{})".format(*values)


def _gen_grounding(rng: random.Random):
    count = rng.randint(1, 3)  # a lone object needs localisation only; distractors need binding too
    combos = list(zip([rng.choice(SHAPES) for _ in range(count)], rng.sample(list(COLORS), count)))
    sizes = [rng.choice([16, 24]) for _ in range(count)]
    # objects on the 8-px lattice (the vision tower's patch grid): box corners land on 0, 125, 250, …
    # of the 0–1000 grid; distinct colours, so objects may touch without merging visually
    objects = [{"shape": s, "color": c, "box": box}
               for (s, c), box in zip(combos, _place_boxes(rng, sizes, margin=0, grid=GROUNDING_GRID))]
    target = rng.randrange(count)
    spec = {"objects": objects, "target": target}
    obj = objects[target]
    question = GROUNDING_PROMPT + f"the {obj['color']} {obj['shape']}"
    return spec, question, format_box_qwen2_vl(obj["box"]), "single" if count == 1 else "refer"


def grounding_box(spec: dict) -> List[float]:
    """Ground-truth box of a grounding item, normalised xyxy in [0, 1]."""
    x0, y0, x1, y1 = spec["objects"][spec["target"]]["box"]
    return [x0 / IMAGE_SIZE, y0 / IMAGE_SIZE, x1 / IMAGE_SIZE, y1 / IMAGE_SIZE]


# ---------------------------------------------------------------------------
# Registry and split generation


@dataclass(frozen=True)
class SynthTaskSpec:
    name: str
    capability: str
    generate: Callable[[random.Random], tuple]
    draw: Callable[[dict, Painter], Image.Image]

    def render(self, spec: dict) -> Image.Image:
        return self.draw(spec, Painter("rgb"))

    def render_labels(self, spec: dict) -> Dict[str, Image.Image]:
        """Per-pixel label maps (mode "L" images) for every label mode of :class:`Painter`."""
        return {mode: self.draw(spec, Painter(mode)) for mode in Painter.MODES[1:]}


TASKS: Dict[str, SynthTaskSpec] = {
    spec.name: spec
    for spec in (
        SynthTaskSpec("synth_vqa", "vqa", _gen_vqa, _draw_objects),
        SynthTaskSpec("synth_geometry", "geometry", _gen_geometry, _draw_geometry),
        SynthTaskSpec("synth_chart", "chart", _gen_chart, _draw_chart),
        SynthTaskSpec("synth_ocr", "ocr", _gen_ocr, _draw_ocr),
        SynthTaskSpec("synth_grounding", "grounding", _gen_grounding, _draw_objects),
    )
}
CAPABILITIES = {spec.capability: name for name, spec in TASKS.items()}


def make_item(task: str, split: str, seed: int, index: int) -> SynthItem:
    spec, question, answer, kind = TASKS[task].generate(_rng(task, split, seed, index))
    return SynthItem(task=task, split=split, index=index, question=question, answers=(answer,),
                     question_type=kind, spec=spec)


def eval_items(task: str, split: str, limit: Optional[int] = None) -> List[SynthItem]:
    """The frozen ``val`` or ``test`` split of ``task`` (``limit`` takes a prefix)."""
    if task not in TASKS:
        raise KeyError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    if split not in EVAL_SPLIT_SEEDS:
        raise ValueError(f"synthetic eval split must be one of {sorted(EVAL_SPLIT_SEEDS)}, got {split!r}")
    size = EVAL_SPLIT_SIZE if limit is None else min(limit, EVAL_SPLIT_SIZE)
    return [make_item(task, split, EVAL_SPLIT_SEEDS[split], i) for i in range(size)]


_EVAL_KEYS: Dict[str, frozenset] = {}


def _eval_keys(task: str) -> frozenset:
    if task not in _EVAL_KEYS:
        _EVAL_KEYS[task] = frozenset(item.key() for split in EVAL_SPLIT_SEEDS for item in eval_items(task, split))
    return _EVAL_KEYS[task]


def train_items(task: str, seed: int, count: int, start: int = 0,
                question_types: Optional[Sequence[str]] = None) -> Iterator[SynthItem]:
    """``count`` training items from the family seed, never equal to a frozen eval item
    (optionally only of the given question types)."""
    excluded = _eval_keys(task)
    index, produced = start, 0
    while produced < count:
        item = make_item(task, "train", seed, index)
        index += 1
        if item.key() in excluded or (question_types is not None and item.question_type not in question_types):
            continue
        produced += 1
        yield item


def split_fingerprint(task: str, split: str, limit: int = EVAL_SPLIT_SIZE) -> str:
    """sha256 over the questions, answers and rendered pixels of a frozen split."""
    digest = hashlib.sha256()
    for item in eval_items(task, split, limit):
        digest.update(item.question.encode())
        digest.update("\x00".join(item.answers).encode())
        digest.update(item.image().tobytes())
    return digest.hexdigest()
