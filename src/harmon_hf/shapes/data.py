"""The Harmon-Shapes world: a deterministic generator of coloured-shape scenes, captions and questions.

A scene is a plain background holding

- `single`: one shape ("a red circle");
- `pair`: two different shapes side by side or one above the other ("a blue square to the left of a green
  triangle", "a red circle above a yellow square");
- `count`: one to three copies of the same shape ("two yellow circles").

Every scene has a structured `PromptSpec` (what the caption says), the placed shapes (where they are), a canonical
caption and question/answer pairs with short exact answers (a colour, a shape, "left"/"right"/"above"/"below" or a
number word). Scene `i` of a split depends only on `(seed, split, i)`, so any scene can be produced on its own and the
same seed always gives the same bytes.

Held-out material (never in the `train` split):

- the colour/shape combinations `ShapesWorld.heldout_combos` (default purple circle and cyan triangle), as any
  object of any scene;
- one in `pair_holdout` of the two-object layouts (an unordered "X left of Y" / "X above Y" arrangement, whichever
  way it is phrased), chosen by a stable hash.

The `test` split draws fresh scenes from all combinations; its `pair` scenes are all held-out layouts, so every
two-object test prompt is unseen in training. `Scene.novel` marks scenes with held-out material. The `all` split
(every combination, own seed stream) is for the autoencoder, which reads no text: like Harmon's kl16, trained on
generic images, it should encode any picture of the world, so that held-out prompts test the model, not the codec.

`write_dataset` writes a split in the layouts the training code reads (see its docstring).
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "HELDOUT_COMBOS",
    "KINDS",
    "NUMBER_WORDS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "ObjectSpec",
    "PlacedShape",
    "PromptSpec",
    "Scene",
    "ShapesWorld",
    "iter_scenes",
    "make_scene",
    "parse_prompt",
    "render_pool",
    "render_shapes",
    "write_dataset",
]

RGB = tuple[int, int, int]

# Six hues roughly 60 degrees apart, saturated enough to stay apart after a lossy autoencoder.
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "yellow": (240, 200, 20),
    "green": (30, 160, 50),
    "cyan": (20, 190, 210),
    "blue": (30, 60, 220),
    "purple": (140, 40, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# relation -> caption phrase; "A <phrase> B" places A on that side of B.
RELATIONS: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
KINDS: tuple[str, ...] = ("single", "pair", "count")
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (("purple", "circle"), ("cyan", "triangle"))
BACKGROUND: RGB = (255, 255, 255)
SPLITS: tuple[str, ...] = ("train", "test", "all")

_MARGIN = 0.04  # free border around every shape, as a fraction of the image side
_PAIR_GAP = 0.08  # smallest gap between the two shapes of a pair
_COUNT_GAP = 0.06  # smallest gap between the copies of a count scene

LAYOUTS: tuple[str, ...] = ("slots", "random")
# The "slots" layout: per scene kind, the centres (x, y) of its objects (fractions of the side; pairs: the left or
# top object first) and the range of their sizes. Each object is moved by up to SLOT_JITTER along both axes. With
# every object's place fixed by the prompt, each latent token depends on the prompt alone (up to the jitter): what a
# tiny model can learn in an hour on a CPU. Free layouts also need the MAR to make its tokens agree with the ones
# drawn before (see the model card).
_CENTRE_SLOT = (((0.5, 0.5),), (0.44, 0.52))
_ROW_SLOTS = (((0.27, 0.5), (0.73, 0.5)), (0.34, 0.38))
SLOTS: dict[str, tuple[tuple[tuple[float, float], ...], tuple[float, float]]] = {
    "single": _CENTRE_SLOT,
    "pair_h": _ROW_SLOTS,
    "pair_v": (((0.5, 0.27), (0.5, 0.73)), (0.34, 0.38)),
    "count1": _CENTRE_SLOT,
    "count2": _ROW_SLOTS,
    "count3": (((0.5, 0.27), (0.27, 0.73), (0.73, 0.73)), (0.3, 0.34)),
}
SLOT_JITTER = 0.03


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ------------------------------------------------------------------------------------------------------------------
# specifications
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """A coloured shape as a prompt names it."""

    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        """ "red circle"."""
        return f"{self.colour} {self.shape}"

    def with_article(self) -> str:
        """ "a red circle"."""
        return f"{_article(self.colour)} {self.phrase}"


@dataclass(frozen=True)
class PromptSpec:
    """What a caption says: the kind of scene, the objects, the relation (pairs) and the count.

    `pair`: `objects = (A, B)` and `relation` places A relative to B ("A to the left of B" is `relation="left"`).
    `count`: `objects = (X,)` and `count` copies of X. `single`: `objects = (X,)`, `count = 1`.
    """

    kind: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        expected = 2 if self.kind == "pair" else 1
        if len(self.objects) != expected:
            raise ValueError(f"a {self.kind} spec needs {expected} object(s), got {len(self.objects)}")
        if self.kind == "pair" and self.relation not in RELATIONS:
            raise ValueError(f"a pair spec needs a relation in {tuple(RELATIONS)}, got {self.relation!r}")
        if self.kind != "pair" and self.relation is not None:
            raise ValueError("only pair specs have a relation")
        if self.kind == "single" and self.count != 1:
            raise ValueError("a single spec has count 1")
        if self.kind == "count" and not 1 <= self.count < len(NUMBER_WORDS):
            raise ValueError(f"count must lie in [1, {len(NUMBER_WORDS) - 1}], got {self.count}")

    @property
    def num_objects(self) -> int:
        """How many shapes the picture must hold."""
        return 2 if self.kind == "pair" else self.count

    @property
    def axis(self) -> str | None:
        """ "h" (left/right) or "v" (above/below) for pairs."""
        if self.relation is None:
            return None
        return "h" if self.relation in ("left", "right") else "v"

    def caption(self) -> str:
        """The canonical caption ("a red circle", "a red circle above a blue square", "two red circles")."""
        if self.kind == "single":
            return self.objects[0].with_article()
        if self.kind == "pair":
            a, b = self.objects
            return f"{a.with_article()} {RELATIONS[self.relation]} {b.with_article()}"
        obj = self.objects[0]
        noun = obj.shape if self.count == 1 else obj.shape + "s"
        return f"{NUMBER_WORDS[self.count]} {obj.colour} {noun}"

    def ordered_pair(self) -> tuple[str, ObjectSpec, ObjectSpec]:
        """A pair as (axis, left-or-top object, right-or-bottom object): one key for both phrasings."""
        a, b = self.objects
        first, second = (a, b) if self.relation in ("left", "above") else (b, a)
        return self.axis or "", first, second

    def ordered(self) -> PromptSpec:
        """The same scene phrased so that the object named first is the left / top one ("B to the right of A" ->
        "A to the left of B"; "B below A" -> "A above B"); singles, counts and left / above pairs are returned as
        they are. `examples/shapes/train.py --captions curriculum` trains its first stages on these captions: then an
        object's side follows from the word order alone, where with both phrasings it depends on the order and the
        relation word together."""
        flipped = {"right": "left", "below": "above"}
        if self.relation not in flipped:
            return self
        return PromptSpec("pair", self.objects[::-1], relation=flipped[self.relation])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "kind": self.kind,
            "objects": [{"colour": o.colour, "shape": o.shape} for o in self.objects],
            "relation": self.relation,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptSpec:
        """Inverse of `to_dict`."""
        objects = tuple(ObjectSpec(o["colour"], o["shape"]) for o in data["objects"])
        return cls(data["kind"], objects, data.get("relation"), int(data.get("count", 1)))


@dataclass(frozen=True)
class PlacedShape:
    """A shape on the canvas; `cx`, `cy` (bounding-box centre) and `size` (box side) are fractions of the side."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    def box(self, resolution: int) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1) in pixels of a `resolution`-sized image."""
        half = self.size / 2
        return (
            (self.cx - half) * resolution,
            (self.cy - half) * resolution,
            (self.cx + half) * resolution,
            (self.cy + half) * resolution,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (coordinates rounded to 4 decimals)."""
        return {
            "colour": self.colour,
            "shape": self.shape,
            "cx": round(self.cx, 4),
            "cy": round(self.cy, 4),
            "size": round(self.size, 4),
        }


# ------------------------------------------------------------------------------------------------------------------
# the world
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ShapesWorld:
    """Parameters of the synthetic world.

    Attributes:
        resolution: image side in pixels (a multiple of 16 for the stride-16 VAE).
        palette: colour name -> RGB.
        shapes: shape names (a subset of circle, square, triangle).
        background: background RGB.
        heldout_combos: (colour, shape) pairs that never appear in the train split.
        pair_holdout: one in `pair_holdout` two-object layouts is held out (0: none).
        kind_weights: how often each kind is drawn when no kind is given.
        max_count: largest count in count scenes.
        supersample: rendering is done this many times larger, then box-filtered down (anti-aliasing).
        layout: `"slots"` (each object in a fixed slot of its scene kind, with a little jitter in position and size;
            see `SLOTS`) or `"random"` (free positions and sizes).
    """

    resolution: int = 64
    palette: dict[str, RGB] = field(default_factory=lambda: dict(PALETTE))
    shapes: tuple[str, ...] = SHAPES
    background: RGB = BACKGROUND
    heldout_combos: tuple[tuple[str, str], ...] = HELDOUT_COMBOS
    pair_holdout: int = 10
    kind_weights: dict[str, float] = field(default_factory=lambda: {"single": 0.3, "pair": 0.4, "count": 0.3})
    max_count: int = 3
    supersample: int = 4
    layout: str = "random"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.resolution < 16:
            raise ValueError(f"resolution must be at least 16, got {self.resolution}")
        unknown = set(self.shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {SHAPES}")
        for colour, shape in self.heldout_combos:
            if colour not in self.palette or shape not in self.shapes:
                raise ValueError(f"held-out combination ({colour}, {shape}) is not in the world")
        unknown_kinds = set(self.kind_weights) - set(KINDS)
        if unknown_kinds:
            raise ValueError(f"unknown scene kinds in kind_weights: {sorted(unknown_kinds)}; known: {KINDS}")
        weights = list(self.kind_weights.values())
        if not all(isinstance(w, (int, float)) and 0 <= w < float("inf") for w in weights) or not sum(weights) > 0:
            raise ValueError(
                f"kind_weights must be finite and non-negative with a positive sum, got {self.kind_weights}"
            )
        if not 1 <= self.max_count < len(NUMBER_WORDS):
            raise ValueError(f"max_count must lie in [1, {len(NUMBER_WORDS) - 1}]")
        if self.layout == "slots" and f"count{self.max_count}" not in SLOTS:
            raise ValueError(f"the slots layout has slots for counts up to 3, got max_count={self.max_count}")

    @property
    def colours(self) -> tuple[str, ...]:
        """Colour names in palette order."""
        return tuple(self.palette)

    def combos(self) -> list[ObjectSpec]:
        """Every (colour, shape) object of the world."""
        return [ObjectSpec(c, s) for c in self.colours for s in self.shapes]

    def is_heldout_object(self, obj: ObjectSpec) -> bool:
        """Whether the object's colour/shape combination is held out of training."""
        return (obj.colour, obj.shape) in set(self.heldout_combos)

    def is_heldout_layout(self, spec: PromptSpec) -> bool:
        """Whether a pair's layout is in the hashed held-out bucket (either phrasing)."""
        if spec.kind != "pair" or self.pair_holdout <= 0:
            return False
        axis, first, second = spec.ordered_pair()
        key = f"{axis}|{first.phrase}|{second.phrase}".encode()
        return zlib.crc32(key) % self.pair_holdout == 0

    def is_heldout(self, spec: PromptSpec) -> bool:
        """Whether a spec never occurs in the train split."""
        return any(self.is_heldout_object(o) for o in spec.objects) or self.is_heldout_layout(spec)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "resolution": self.resolution,
            "palette": {k: list(v) for k, v in self.palette.items()},
            "shapes": list(self.shapes),
            "background": list(self.background),
            "heldout_combos": [list(c) for c in self.heldout_combos],
            "pair_holdout": self.pair_holdout,
            "kind_weights": dict(self.kind_weights),
            "max_count": self.max_count,
            "supersample": self.supersample,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapesWorld:
        """Inverse of `to_dict`."""
        return cls(
            resolution=int(data["resolution"]),
            palette={k: tuple(v) for k, v in data["palette"].items()},
            shapes=tuple(data["shapes"]),
            background=tuple(data["background"]),
            heldout_combos=tuple(tuple(c) for c in data["heldout_combos"]),
            pair_holdout=int(data["pair_holdout"]),
            kind_weights=dict(data["kind_weights"]),
            max_count=int(data["max_count"]),
            supersample=int(data["supersample"]),
            layout=str(data.get("layout", "random")),  # worlds written before layouts existed were random
        )


# ------------------------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------------------------
def render_shapes(
    shapes: Sequence[PlacedShape],
    resolution: int = 64,
    palette: Mapping[str, RGB] = PALETTE,
    background: RGB = BACKGROUND,
    supersample: int = 4,
) -> Image.Image:
    """Draw the shapes (later ones on top) on a plain background; returns an RGB PIL image."""
    big = resolution * supersample
    canvas = Image.new("RGB", (big, big), tuple(background))
    draw = ImageDraw.Draw(canvas)
    for item in shapes:
        x0, y0, x1, y1 = (round(v) for v in item.box(big))
        colour = tuple(palette[item.colour])
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif item.shape == "triangle":  # upright isosceles: apex at the top centre, base along the bottom
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour)
        else:
            raise ValueError(f"unknown shape {item.shape!r}")
    if supersample == 1:
        return canvas
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


# ------------------------------------------------------------------------------------------------------------------
# scenes
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Scene:
    """One generated example: spec, placed shapes, caption and question/answer pairs.

    `qa` holds `(question, answer, type)` triples, type in colour/shape/position/count.
    """

    spec: PromptSpec
    shapes: tuple[PlacedShape, ...]
    qa: list[tuple[str, str, str]]
    split: str = "train"
    index: int = 0
    seed: int = 0
    novel: bool = False

    @property
    def caption(self) -> str:
        """The canonical caption of the spec."""
        return self.spec.caption()

    def render(self, world: ShapesWorld | None = None) -> Image.Image:
        """The scene as an RGB PIL image."""
        world = world or ShapesWorld()
        return render_shapes(self.shapes, world.resolution, world.palette, world.background, world.supersample)

    def to_record(self, image: str) -> dict[str, Any]:
        """The JSON list entry of this scene (`image` = the image path relative to the list)."""
        return {
            "image": image,
            "caption": self.caption,
            "qa": [[q, a] for q, a, _ in self.qa],
            "qa_types": [t for _, _, t in self.qa],
            "kind": self.spec.kind,
            "spec": self.spec.to_dict(),
            "shapes": [s.to_dict() for s in self.shapes],
            "novel": self.novel,
            "split": self.split,
            "index": self.index,
            "caption_ordered": self.spec.ordered().caption(),
        }


def _uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _pick(rng: random.Random, items: Sequence[Any]) -> Any:
    return items[int(rng.random() * len(items))]


def _pick_weighted(rng: random.Random, weights: Mapping[str, float]) -> str:
    total = sum(weights.values())
    x = rng.random() * total
    for key, weight in weights.items():
        x -= weight
        if x < 0:
            return key
    return list(weights)[-1]


def _place_single(rng: random.Random, obj: ObjectSpec) -> list[PlacedShape]:
    size = _uniform(rng, 0.3, 0.55)
    lo, hi = size / 2 + _MARGIN, 1 - size / 2 - _MARGIN
    return [PlacedShape(obj.colour, obj.shape, _uniform(rng, lo, hi), _uniform(rng, lo, hi), size)]


def _place_pair(rng: random.Random, spec: PromptSpec) -> list[PlacedShape]:
    a, b = spec.objects
    size_a, size_b = _uniform(rng, 0.22, 0.32), _uniform(rng, 0.22, 0.32)
    distance = _uniform(rng, (size_a + size_b) / 2 + _PAIR_GAP, 0.58)
    skew = _uniform(rng, -0.2, 0.2) * distance  # offset across the relation axis (B minus A)
    sign = -1.0 if spec.relation in ("left", "above") else 1.0  # A's side along the axis
    # Along the axis: A at mid + sign * d/2, B at mid - sign * d/2.
    pos_a, pos_b = sign * distance / 2, -sign * distance / 2
    lo = max(_MARGIN + size_a / 2 - pos_a, _MARGIN + size_b / 2 - pos_b)
    hi = min(1 - _MARGIN - size_a / 2 - pos_a, 1 - _MARGIN - size_b / 2 - pos_b)
    mid = _uniform(rng, lo, hi)
    lo = max(_MARGIN + size_a / 2 + skew / 2, _MARGIN + size_b / 2 - skew / 2)
    hi = min(1 - _MARGIN - size_a / 2 + skew / 2, 1 - _MARGIN - size_b / 2 - skew / 2)
    across = _uniform(rng, lo, hi)
    along_a, along_b = mid + pos_a, mid + pos_b
    across_a, across_b = across - skew / 2, across + skew / 2
    if spec.axis == "h":
        return [
            PlacedShape(a.colour, a.shape, along_a, across_a, size_a),
            PlacedShape(b.colour, b.shape, along_b, across_b, size_b),
        ]
    return [
        PlacedShape(a.colour, a.shape, across_a, along_a, size_a),
        PlacedShape(b.colour, b.shape, across_b, along_b, size_b),
    ]


def _apart(x: PlacedShape, y: PlacedShape, gap: float) -> bool:
    limit = (x.size + y.size) / 2 + gap
    return abs(x.cx - y.cx) >= limit or abs(x.cy - y.cy) >= limit


def _place_count(rng: random.Random, obj: ObjectSpec, count: int) -> list[PlacedShape]:
    high = 0.34 if count > 1 else 0.5
    for attempt in range(100):
        scale = 0.97**attempt  # shrink if a layout keeps failing
        placed: list[PlacedShape] = []
        for _ in range(count):
            size = _uniform(rng, 0.2, high) * scale
            lo, hi = size / 2 + _MARGIN, 1 - size / 2 - _MARGIN
            for _ in range(50):
                candidate = PlacedShape(obj.colour, obj.shape, _uniform(rng, lo, hi), _uniform(rng, lo, hi), size)
                if all(_apart(candidate, other, _COUNT_GAP) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == count:
            return placed
    raise RuntimeError(f"could not place {count} shapes")  # pragma: no cover - unreachable for count <= 5


def _place_slots(rng: random.Random, spec: PromptSpec) -> list[PlacedShape]:
    if spec.kind == "pair":
        slots, sizes = SLOTS["pair_h" if spec.axis == "h" else "pair_v"]
        # slot order: left / top first
        swap = spec.relation not in ("left", "above")
        objects = spec.objects[::-1] if swap else spec.objects
    else:
        slots, sizes = SLOTS["single"] if spec.kind == "single" else SLOTS[f"count{spec.count}"]
        swap, objects = False, spec.objects * len(slots)
    placed = []
    for obj, (x, y) in zip(objects, slots):
        dx, dy = _uniform(rng, -SLOT_JITTER, SLOT_JITTER), _uniform(rng, -SLOT_JITTER, SLOT_JITTER)
        placed.append(PlacedShape(obj.colour, obj.shape, x + dx, y + dy, _uniform(rng, *sizes)))
    # A pair lists its objects as the caption names them (A, then B), whatever side A is on.
    return placed[::-1] if swap else placed


def place(spec: PromptSpec, rng: random.Random, layout: str = "random") -> list[PlacedShape]:
    """Shapes realising `spec`: free positions and sizes (`layout="random"`) or the kind's slots with jitter
    (`"slots"`), drawn from `rng`."""
    if layout == "slots":
        return _place_slots(rng, spec)
    if layout != "random":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if spec.kind == "single":
        return _place_single(rng, spec.objects[0])
    if spec.kind == "pair":
        return _place_pair(rng, spec)
    return _place_count(rng, spec.objects[0], spec.count)


# ----- questions --------------------------------------------------------------------------------------------------
def _colour_word(rng: random.Random) -> str:
    return "colour" if rng.random() < 0.5 else "color"


def _side_words(axis: str) -> tuple[str, str, str]:
    """(preposition, low side, high side) naming the ends of an axis."""
    return ("on the", "left", "right") if axis == "h" else ("at the", "top", "bottom")


def make_qa(spec: PromptSpec, shapes: Sequence[PlacedShape], rng: random.Random) -> list[tuple[str, str, str]]:
    """One question of each applicable type (colour, shape, position, count) with its exact answer."""
    qa: list[tuple[str, str, str]] = []
    n = spec.num_objects
    if spec.kind == "pair":
        axis = spec.axis or "h"
        prep, low, high = _side_words(axis)
        key = (lambda s: s.cx) if axis == "h" else (lambda s: s.cy)
        ordered = sorted(shapes, key=key)
        sides = {low: ordered[0], high: ordered[1]}
        distinct_shapes = shapes[0].shape != shapes[1].shape
        distinct_colours = shapes[0].colour != shapes[1].colour
        side = _pick(rng, (low, high))
        target = sides[side]
        if distinct_shapes and rng.random() < 0.5:
            qa.append((f"What {_colour_word(rng)} is the {target.shape}?", target.colour, "colour"))
        else:
            qa.append((f"What {_colour_word(rng)} is the shape {prep} {side}?", target.colour, "colour"))
        side = _pick(rng, (low, high))
        target = sides[side]
        if distinct_colours and rng.random() < 0.5:
            qa.append((f"What shape is the {target.colour} object?", target.shape, "shape"))
        else:
            qa.append((f"What shape is {prep} {side}?", target.shape, "shape"))
        subject, other = (shapes[0], shapes[1]) if rng.random() < 0.5 else (shapes[1], shapes[0])
        if axis == "h":
            options, answer = "to the left or to the right of", "left" if subject.cx < other.cx else "right"
        else:
            options, answer = "above or below", "above" if subject.cy < other.cy else "below"
        question = f"Is the {subject.colour} {subject.shape} {options} the {other.colour} {other.shape}?"
        qa.append((question, answer, "position"))
        qa.append(("How many shapes are there?", NUMBER_WORDS[n], "count"))
        return qa
    obj = spec.objects[0]
    if n == 1:
        if rng.random() < 0.5:
            qa.append((f"What {_colour_word(rng)} is the shape?", obj.colour, "colour"))
        else:
            qa.append((f"What {_colour_word(rng)} is the {obj.shape}?", obj.colour, "colour"))
        if rng.random() < 0.5:
            qa.append(("What shape is it?", obj.shape, "shape"))
        else:
            qa.append((f"What shape is the {obj.colour} object?", obj.shape, "shape"))
    else:
        qa.append((f"What {_colour_word(rng)} are the shapes?", obj.colour, "colour"))
        qa.append(("What shape are they?", obj.shape, "shape"))
    if spec.kind == "count" and rng.random() < 0.5:
        qa.append((f"How many {obj.shape}s are there?", NUMBER_WORDS[n], "count"))
    else:
        qa.append(("How many shapes are there?", NUMBER_WORDS[n], "count"))
    return qa


# ----- sampling ---------------------------------------------------------------------------------------------------
def _random_spec(rng: random.Random, world: ShapesWorld, kind: str) -> PromptSpec:
    colour = _pick(rng, world.colours)
    shape = _pick(rng, world.shapes)
    first = ObjectSpec(colour, shape)
    if kind == "single":
        return PromptSpec("single", (first,))
    if kind == "count":
        return PromptSpec("count", (first,), count=1 + int(rng.random() * world.max_count))
    while True:
        second = ObjectSpec(_pick(rng, world.colours), _pick(rng, world.shapes))
        if second != first:
            return PromptSpec("pair", (first, second), relation=_pick(rng, tuple(RELATIONS)))


def make_scene(
    index: int, split: str = "train", seed: int = 0, kind: str | None = None, world: ShapesWorld | None = None
) -> Scene:
    """Scene `index` of `split` (a function of `(seed, split, kind, index)` only).

    Args:
        index: position in the split.
        split: `"train"` (no held-out material), `"test"` (fresh scenes; pairs are always held-out layouts) or
            `"all"` (every combination and layout, unfiltered: pictures for the text-free autoencoder).
        seed: dataset seed.
        kind: `"single"`, `"pair"` or `"count"`; None draws it with `world.kind_weights`.
        world: the world parameters (default `ShapesWorld()`).
    """
    world = world or ShapesWorld()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    # str seeds go through SHA-512 in `random.seed`: stable across platforms and Python versions.
    rng = random.Random(f"harmon-shapes/{seed}/{split}/{kind or 'any'}/{index}")
    kind = kind or _pick_weighted(rng, world.kind_weights)
    for _ in range(10_000):
        spec = _random_spec(rng, world, kind)
        heldout = world.is_heldout(spec)
        if split == "train" and not heldout:
            break
        if split == "test" and (kind != "pair" or heldout):
            break
        if split == "all":
            break
    else:  # pragma: no cover - only when the hold-out removes (nearly) everything
        raise RuntimeError("the held-out settings leave no scene to draw")
    shapes = place(spec, rng, world.layout)
    qa = make_qa(spec, shapes, rng)
    return Scene(spec, tuple(shapes), qa, split=split, index=index, seed=seed, novel=heldout)


def iter_scenes(
    n: int,
    split: str = "train",
    seed: int = 0,
    kind: str | None = None,
    world: ShapesWorld | None = None,
    start: int = 0,
) -> Iterator[Scene]:
    """Scenes `start .. start + n - 1` of a split (see `make_scene`)."""
    for index in range(start, start + n):
        yield make_scene(index, split, seed, kind, world)


def render_pool(
    n: int, split: str = "train", seed: int = 0, kind: str | None = None, world: ShapesWorld | None = None
) -> np.ndarray:
    """The images of the first `n` scenes as a uint8 array `(n, H, W, 3)` (for autoencoder training)."""
    world = world or ShapesWorld()
    out = np.empty((n, world.resolution, world.resolution, 3), dtype=np.uint8)
    for i, scene in enumerate(iter_scenes(n, split, seed, kind, world)):
        out[i] = np.asarray(scene.render(world))
    return out


# ------------------------------------------------------------------------------------------------------------------
# prompts -> specs
# ------------------------------------------------------------------------------------------------------------------
def parse_prompt(text: str, world: ShapesWorld | None = None) -> PromptSpec | None:
    """Read a prompt in the world's grammar back into a `PromptSpec` (None when it does not parse).

    Accepted (case-insensitive, trailing period allowed, "a"/"an"/"one" as article): "a red circle",
    "a red circle to the left of a blue square" (and right of / above / below), "two red circles" (number words
    or digits).
    """
    world = world or ShapesWorld()
    colours = "|".join(re.escape(c) for c in world.colours)
    shapes = "|".join(re.escape(s) for s in world.shapes)
    phrase = rf"(?:an?|one|the)\s+({colours})\s+({shapes})"
    relations = "|".join(re.escape(p) for p in RELATIONS.values())
    clean = " ".join(text.lower().strip().rstrip(".").split())
    match = re.fullmatch(rf"{phrase}\s+({relations})\s+{phrase}", clean)
    if match:
        relation = next(k for k, v in RELATIONS.items() if v == match.group(3))
        objects = (ObjectSpec(match.group(1), match.group(2)), ObjectSpec(match.group(4), match.group(5)))
        return PromptSpec("pair", objects, relation=relation)
    numbers = "|".join(NUMBER_WORDS[1:]) + "|[1-9]"
    match = re.fullmatch(rf"({numbers})\s+({colours})\s+({shapes})(?:e?s)?", clean)
    if match and match.group(1) not in ("one", "1"):
        word = match.group(1)
        count = int(word) if word.isdigit() else NUMBER_WORDS.index(word)
        if count >= len(NUMBER_WORDS):
            return None
        return PromptSpec("count", (ObjectSpec(match.group(2), match.group(3)),), count=count)
    match = re.fullmatch(phrase, clean)
    if match:
        return PromptSpec("single", (ObjectSpec(match.group(1), match.group(2)),))
    return None


# ------------------------------------------------------------------------------------------------------------------
# writing datasets
# ------------------------------------------------------------------------------------------------------------------
def _llava(image: str, turns: Sequence[tuple[str, str]]) -> dict[str, Any]:
    conversation: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        conversation.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        conversation.append({"from": "gpt", "value": answer})
    return {"image": image, "conversations": conversation}


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_ordered_info(out: Path, split: str) -> None:
    info = {
        "annotations": "../captions.json",
        "image_folder": "..",
        "caption_key": "caption_ordered",
        "name": f"shapes-{split}-ordered",
    }
    (out / "ordered").mkdir(exist_ok=True)
    _dump(out / "ordered" / "data_info.json", {"datasets": [info]})


def write_ordered_captions(out_dir: str | Path) -> int:
    """Give a dataset folder written before ordered captions existed what `write_dataset` now writes: the
    `caption_ordered` field (the caption of `PromptSpec.ordered()`) in every record of `out_dir/captions.json`, and
    `out_dir/ordered/data_info.json`, which reads the same pictures with that caption. Idempotent.

    Returns:
        How many captions were rephrased (the right / below pairs).
    """
    out = Path(out_dir)
    records = json.loads((out / "captions.json").read_text(encoding="utf-8"))
    rephrased = 0
    for record in records:
        record["caption_ordered"] = PromptSpec.from_dict(record["spec"]).ordered().caption()
        rephrased += record["caption_ordered"] != record["caption"]
    # written beside and renamed over: an interruption leaves the old list whole, never half a file
    partial = out / "captions.json.partial"
    _dump(partial, records)
    partial.replace(out / "captions.json")
    _write_ordered_info(out, records[0]["split"] if records else "empty")
    return rephrased


def write_dataset(
    out_dir: str | Path,
    n: int,
    split: str = "train",
    seed: int = 0,
    kind: str | None = None,
    world: ShapesWorld | None = None,
) -> dict[str, Any]:
    """Render `n` scenes of a split into `out_dir` and write every index the training code reads.

    Files written::

        images/000000.png ...        the pictures (RGB PNG, `world.resolution` px)
        captions.json                JSON list: {"image", "caption", "qa": [[q, a], ...], "qa_types", "kind",
                                     "spec", "shapes", "novel", "split", "index", "caption_ordered"}
                                     (`caption_ordered`: the caption of `PromptSpec.ordered()`)
        data_info.json               upstream layout: {"datasets": [{"annotations": "captions.json",
                                     "image_folder": ".", "caption_key": "caption"}]} (text-to-image and captioning)
        ordered/data_info.json       the same pictures with `caption_ordered` as the caption (pairs always phrased
                                     left / above first)
        metadata.jsonl               🤗 imagefolder rows {"file_name", "text", "qa"}
        conversations.json           LLaVA list, one question per entry (understanding)
        conversations_multiturn.json LLaVA list, all questions of an image in one conversation (shuffled order)
        world.json                   the world parameters, split, seed and counts

    `load_source(out_dir)` (training/data.py) reads `data_info.json` (`load_source(out_dir / "ordered")` the
    ordered captions); pass `out_dir/metadata.jsonl` for the image
    folder, `out_dir/conversations.json` for the question/answer data.

    Returns:
        The summary also stored in `world.json`.
    """
    world = world or ShapesWorld()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, single_turn, multi_turn = [], [], []
    metadata_lines = []
    kinds: dict[str, int] = {}
    for scene in iter_scenes(n, split, seed, kind, world):
        rel = f"images/{scene.index:06d}.png"
        scene.render(world).save(out / rel, format="PNG")
        record = scene.to_record(rel)
        records.append(record)
        kinds[scene.spec.kind] = kinds.get(scene.spec.kind, 0) + 1
        metadata_lines.append(json.dumps({"file_name": rel, "text": scene.caption, "qa": record["qa"]}))
        for question, answer, _ in scene.qa:
            single_turn.append(_llava(rel, [(question, answer)]))
        order = list(range(len(scene.qa)))
        random.Random(f"harmon-shapes/turns/{seed}/{split}/{scene.index}").shuffle(order)
        multi_turn.append(_llava(rel, [scene.qa[i][:2] for i in order]))
    _dump(out / "captions.json", records)
    _dump(out / "conversations.json", single_turn)
    _dump(out / "conversations_multiturn.json", multi_turn)
    (out / "metadata.jsonl").write_text("\n".join(metadata_lines) + "\n", encoding="utf-8")
    info = {"annotations": "captions.json", "image_folder": ".", "caption_key": "caption", "name": f"shapes-{split}"}
    _dump(out / "data_info.json", {"datasets": [info]})
    _write_ordered_info(out, split)
    summary = {
        "split": split,
        "seed": seed,
        "num_images": n,
        "num_questions": len(single_turn),
        "kinds": kinds,
        "novel": sum(r["novel"] for r in records),
        "world": world.to_dict(),
    }
    _dump(out / "world.json", summary)
    return summary
