"""ShapesEval: GenEval in miniature for the Harmon-Shapes world, plus exact-match question answering.

- Generation: `ShapeDetector` finds the drawn shapes in an RGB image (every pixel is explained as a mix of the
  background and one palette colour; connected components of each colour; the shape is the circle/square/triangle
  template with the best IoU inside the component's bounding box) and `match_spec` checks the detections against
  the prompt's `PromptSpec`: colours, shapes, the number of objects and, for pairs, the relation (the dominant
  centre offset must point the stated way).
- Understanding: `understanding_accuracy` asks `answer_fn(image, question)` the questions of held-out images and
  compares normalised answers with the exact ones.
- `evaluate(generate_fn, answer_fn, ...)` runs both on the `test` split (or, with `split="train"`, on fresh scenes
  drawn like the training split, to tell under-fitting from a failure to generalise), prints a table and writes JSON;
  `validate_scorer` runs it with ground-truth images, a rule-based answerer and mismatched prompts.

The model is reached only through the two callables:

- `generate_fn(prompts: list[str], seed: int) -> list[PIL.Image]` (one image per prompt; a batch at a time);
- `answer_fn(image: PIL.Image, question: str) -> str`.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import (
    KINDS,
    NUMBER_WORDS,
    OPPOSITE,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapesWorld,
    make_scene,
    parse_prompt,
    place,
    render_shapes,
)

__all__ = [
    "EVAL_SPLITS",
    "TARGETS",
    "Detection",
    "DetectionAnswerer",
    "ShapeDetector",
    "evaluate",
    "format_table",
    "ground_truth_generate_fn",
    "heldout_material",
    "true_scenes_generate_fn",
    "match_spec",
    "normalize_answer",
    "perturb_spec",
    "score_image",
    "understanding_accuracy",
    "validate_scorer",
]

GenerateFn = Callable[[list[str], int], Sequence[Image.Image]]
AnswerFn = Callable[[Image.Image, str], str]

# Acceptance thresholds of issue #7 (metric path -> smallest accepted value).
TARGETS: dict[str, float] = {
    "generation/single": 0.8,
    "generation/pair": 0.5,
    "understanding/colour": 0.9,
    "understanding/shape": 0.9,
}

# Where `evaluate` draws its scenes: held-out test scenes, or new scenes of the training distribution.
EVAL_SPLITS: tuple[str, ...] = ("test", "train")


# ------------------------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Detection:
    """A shape found in an image. `cx`, `cy`: bounding-box centre as fractions of the width/height."""

    colour: str
    shape: str
    area: int
    box: tuple[int, int, int, int]
    cx: float
    cy: float
    shape_scores: dict[str, float] = field(default_factory=dict)

    def matches(self, obj: ObjectSpec) -> bool:
        """Same colour and shape as `obj`."""
        return self.colour == obj.colour and self.shape == obj.shape

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "colour": self.colour,
            "shape": self.shape,
            "area": self.area,
            "box": list(self.box),
            "cx": round(self.cx, 4),
            "cy": round(self.cy, 4),
            "shape_scores": {k: round(v, 3) for k, v in self.shape_scores.items()},
        }


def _neighbour_min(values: np.ndarray, fill: int) -> np.ndarray:
    """Minimum over each pixel's 3x3 neighbourhood (8-connectivity), `fill` outside the image."""
    padded = np.pad(values, 1, constant_values=fill)
    h, w = values.shape
    out = values.copy()
    for dy in range(3):
        for dx in range(3):
            np.minimum(out, padded[dy : dy + h, dx : dx + w], out=out)
    return out


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as boolean masks (largest first)."""
    if not mask.any():
        return []
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # propagate the smallest index through each component
        spread = np.where(mask, _neighbour_min(labels, big), big)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    return [labels == i for i in ids[np.argsort(-counts, kind="stable")]]


def shape_templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal circle / square / upright triangle masks filling a `height` x `width` box (pixel centres)."""
    y = (np.arange(height) + 0.5)[:, None] / height
    x = (np.arange(width) + 0.5)[None, :] / width
    return {
        "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(x - 0.5) <= y / 2,
    }


class ShapeDetector:
    """Finds coloured shapes on a plain background.

    Each pixel p is compared with the segments from the background colour w to every palette colour c: the best
    colour is the one whose segment passes closest to p, and p belongs to it when its mixing weight along the
    segment is at least `min_alpha` and the distance at most `max_residual` (anti-aliased and blurred edges thus
    keep their colour). Components smaller than `min_area` (fraction of the image) or `min_relative_area` of the
    largest one are noise. The shape is the template (`shape_templates`) of best IoU with the component inside its
    bounding box, "unknown" below `min_shape_iou`.

    Args:
        world: palette, shapes and background (default `ShapesWorld()`).
        min_area, min_relative_area, max_residual, min_alpha, min_shape_iou: see above.
        max_side: larger images are box-filtered down to this side first (speed).
        estimate_background: use the median colour of the image border instead of `world.background`.
    """

    def __init__(
        self,
        world: ShapesWorld | None = None,
        min_area: float = 0.004,
        min_relative_area: float = 0.1,
        max_residual: float = 70.0,
        min_alpha: float = 0.5,
        min_shape_iou: float = 0.5,
        max_side: int = 128,
        estimate_background: bool = True,
    ):
        self.world = world or ShapesWorld()
        self.names = list(self.world.colours)
        self.colours = np.array([self.world.palette[c] for c in self.names], dtype=np.float32)
        self.min_area = min_area
        self.min_relative_area = min_relative_area
        self.max_residual = max_residual
        self.min_alpha = min_alpha
        self.min_shape_iou = min_shape_iou
        self.max_side = max_side
        self.estimate_background = estimate_background

    def to_array(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The image as float32 `(H, W, 3)` RGB levels, downscaled to `max_side` when larger."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = image.convert("RGB")
        if max(image.size) > self.max_side:
            scale = self.max_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BOX)
        return np.asarray(image, dtype=np.float32)

    def background(self, pixels: np.ndarray) -> np.ndarray:
        """Background colour: median of the border pixels (or the world's background)."""
        if not self.estimate_background:
            return np.array(self.world.background, dtype=np.float32)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        return np.median(border, axis=0).astype(np.float32)

    def label_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Palette index of each pixel, -1 for background / unexplained pixels."""
        bg = self.background(pixels)
        direction = self.colours - bg  # (K, 3)
        offset = pixels[..., None, :] - bg  # (H, W, K, 3)
        alpha = (offset * direction).sum(-1) / np.maximum((direction**2).sum(-1), 1e-6)
        alpha = np.clip(alpha, 0.0, 1.0)
        residual = np.linalg.norm(offset - alpha[..., None] * direction, axis=-1)  # (H, W, K)
        best = residual.argmin(-1)
        best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
        best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
        keep = (best_alpha >= self.min_alpha) & (best_residual <= self.max_residual)
        return np.where(keep, best, -1)

    def classify_shape(self, mask: np.ndarray) -> tuple[str, dict[str, float]]:
        """Best-IoU template for a component mask cropped to its bounding box."""
        scores = {}
        for name, template in shape_templates(*mask.shape).items():
            if name not in self.world.shapes:
                continue
            union = np.logical_or(mask, template).sum()
            scores[name] = float(np.logical_and(mask, template).sum() / max(union, 1))
        best = max(scores, key=scores.__getitem__)
        return (best if scores[best] >= self.min_shape_iou else "unknown"), scores

    def detect(self, image: Image.Image | np.ndarray) -> list[Detection]:
        """The shapes in `image` (largest first)."""
        pixels = self.to_array(image)
        h, w = pixels.shape[:2]
        labels = self.label_pixels(pixels)
        found: list[tuple[int, np.ndarray]] = []
        for k in np.unique(labels):
            if k < 0:
                continue
            for component in connected_components(labels == k):
                found.append((int(k), component))
        if not found:
            return []
        largest = max(int(c.sum()) for _, c in found)
        limit = max(self.min_area * h * w, self.min_relative_area * largest)
        detections = []
        for k, component in found:
            area = int(component.sum())
            if area < limit:
                continue
            ys, xs = np.nonzero(component)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            shape, scores = self.classify_shape(component[y0:y1, x0:x1])
            cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
            detections.append(Detection(self.names[k], shape, area, (x0, y0, x1, y1), cx, cy, scores))
        detections.sort(key=lambda d: -d.area)
        return detections


# ------------------------------------------------------------------------------------------------------------------
# generation scoring
# ------------------------------------------------------------------------------------------------------------------
def relation_holds(a: Detection, b: Detection, relation: str, margin: float = 0.05) -> bool:
    """Whether `a` is `relation` of `b`: the centre offset along the relation's axis points the stated way, exceeds
    `margin` (fraction of the side) and is larger than the offset across it."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > margin and along > abs(across)


def match_spec(spec: PromptSpec, detections: Sequence[Detection], margin: float = 0.05) -> dict[str, Any]:
    """Check detections against a spec.

    Returns a dict: `correct` (all of: the prompted objects with the right colour AND shape, no other object, the
    relation for pairs), `colour` (every prompted colour is present), `shape` (every prompted shape is present),
    `count` (as many objects as prompted), `position` (pairs: two matching objects in the stated relation; None
    otherwise), `num_detections`, `detections`.
    """
    dets = list(detections)
    colour_ok = all(any(d.colour == o.colour for d in dets) for o in spec.objects)
    shape_ok = all(any(d.shape == o.shape for d in dets) for o in spec.objects)
    count_ok = len(dets) == spec.num_objects
    position: bool | None = None
    if spec.kind == "pair":
        a_spec, b_spec = spec.objects
        pairs = [
            (a, b)
            for i, a in enumerate(dets)
            for j, b in enumerate(dets)
            if i != j and a.matches(a_spec) and b.matches(b_spec)
        ]
        objects_ok = bool(pairs)
        position = any(relation_holds(a, b, spec.relation or "left", margin) for a, b in pairs)
        correct = objects_ok and position and count_ok
    else:
        matching = sum(d.matches(spec.objects[0]) for d in dets)
        correct = matching == spec.num_objects and count_ok
    return {
        "correct": bool(correct),
        "colour": bool(colour_ok),
        "shape": bool(shape_ok),
        "count": bool(count_ok),
        "position": position,
        "num_detections": len(dets),
        "detections": [d.to_dict() for d in dets],
    }


def score_image(
    image: Image.Image | np.ndarray,
    spec: PromptSpec | str,
    detector: ShapeDetector | None = None,
    world: ShapesWorld | None = None,
) -> dict[str, Any]:
    """Detect the shapes in `image` and check them against `spec` (a `PromptSpec` or a prompt string)."""
    detector = detector or ShapeDetector(world)
    if isinstance(spec, str):
        parsed = parse_prompt(spec, detector.world)
        if parsed is None:
            raise ValueError(f"cannot parse prompt {spec!r} in the shapes grammar")
        spec = parsed
    return match_spec(spec, detector.detect(image))


def perturb_spec(spec: PromptSpec, rng: random.Random, world: ShapesWorld | None = None) -> PromptSpec:
    """A spec that a picture of `spec` does NOT satisfy: another colour or shape for one object, the opposite
    relation (pairs) or another count (count scenes)."""
    world = world or ShapesWorld()
    options = (
        ["colour", "shape"]
        + (["relation"] if spec.kind == "pair" else [])
        + (["count"] if spec.kind == "count" else [])
    )
    change = options[int(rng.random() * len(options))]
    objects = list(spec.objects)
    if change == "relation":
        return PromptSpec("pair", spec.objects, relation=OPPOSITE[spec.relation or "left"])
    if change == "count":
        counts = [c for c in range(1, world.max_count + 1) if c != spec.count]
        return PromptSpec("count", spec.objects, count=counts[int(rng.random() * len(counts))])
    i = int(rng.random() * len(objects))
    if change == "colour":
        choices = [c for c in world.colours if c != objects[i].colour]
        objects[i] = ObjectSpec(choices[int(rng.random() * len(choices))], objects[i].shape)
    else:
        choices = [s for s in world.shapes if s != objects[i].shape]
        objects[i] = ObjectSpec(objects[i].colour, choices[int(rng.random() * len(choices))])
    return PromptSpec(spec.kind, tuple(objects), spec.relation, spec.count)


def ground_truth_generate_fn(world: ShapesWorld | None = None) -> GenerateFn:
    """A `generate_fn` that renders each prompt exactly (parsed with `parse_prompt`): the scorer's upper bound."""
    world = world or ShapesWorld()

    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        images = []
        for i, prompt in enumerate(prompts):
            spec = parse_prompt(prompt, world)
            if spec is None:
                raise ValueError(f"cannot parse prompt {prompt!r}")
            rng = random.Random(f"harmon-shapes/oracle/{seed}/{i}/{prompt}")
            images.append(
                render_shapes(place(spec, rng, world.layout), world.resolution, world.palette, world.background)
            )
        return images

    return generate


# ------------------------------------------------------------------------------------------------------------------
# understanding
# ------------------------------------------------------------------------------------------------------------------
_NUMBER_DIGITS = {str(i): w for i, w in enumerate(NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    """Lower-case, first line, no surrounding punctuation, no leading article, digits as number words."""
    text = (text or "").strip().lower().split("\n")[0]
    text = re.sub(r"[\s\.\!\?,;:\"']+$", "", text).strip(" \"'")
    text = re.sub(r"^(?:a|an|the)\s+", "", text)
    text = " ".join(text.split())
    return _NUMBER_DIGITS.get(text, text)


class DetectionAnswerer:
    """A rule-based `answer_fn` reading the shapes with `ShapeDetector` (knows the question templates of
    `data.make_qa`); on ground-truth images it answers everything right, which checks the questions against the
    pictures. Unknown questions get ""."""

    def __init__(self, detector: ShapeDetector | None = None):
        self.detector = detector or ShapeDetector()
        world = self.detector.world
        self._colours = "|".join(re.escape(c) for c in world.colours)
        self._shapes = "|".join(re.escape(s) for s in world.shapes)

    @staticmethod
    def _extreme(dets: Sequence[Detection], side: str) -> Detection:
        key = {"left": lambda d: d.cx, "right": lambda d: -d.cx, "top": lambda d: d.cy, "bottom": lambda d: -d.cy}
        return min(dets, key=key[side])

    @staticmethod
    def _majority(values: Sequence[str]) -> str:
        return max(sorted(set(values)), key=list(values).count) if values else ""

    def __call__(self, image: Image.Image, question: str) -> str:
        dets = self.detector.detect(image)
        q = " ".join(question.lower().strip().split())
        c, s = self._colours, self._shapes
        if not dets:
            return ""
        if m := re.fullmatch(r"how many shapes are there\?", q):
            return NUMBER_WORDS[min(len(dets), len(NUMBER_WORDS) - 1)]
        if m := re.fullmatch(rf"how many ({s})s are there\?", q):
            return NUMBER_WORDS[min(sum(d.shape == m.group(1) for d in dets), len(NUMBER_WORDS) - 1)]
        if m := re.fullmatch(r"what colou?r is the shape (?:on|at) the (left|right|top|bottom)\?", q):
            return self._extreme(dets, m.group(1)).colour
        if m := re.fullmatch(r"what colou?r (?:is the shape|are the shapes)\?", q):
            return self._majority([d.colour for d in dets])
        if m := re.fullmatch(rf"what colou?r is the ({s})\?", q):
            return self._majority([d.colour for d in dets if d.shape == m.group(1)])
        if m := re.fullmatch(r"what shape is (?:on|at) the (left|right|top|bottom)\?", q):
            return self._extreme(dets, m.group(1)).shape
        if m := re.fullmatch(r"what shape (?:is it|are they)\?", q):
            return self._majority([d.shape for d in dets])
        if m := re.fullmatch(rf"what shape is the ({c}) object\?", q):
            return self._majority([d.shape for d in dets if d.colour == m.group(1)])
        pattern = rf"is the ({c}) ({s}) (to the left or to the right of|above or below) the ({c}) ({s})\?"
        if m := re.fullmatch(pattern, q):
            subject = [d for d in dets if d.colour == m.group(1) and d.shape == m.group(2)]
            other = [d for d in dets if d.colour == m.group(4) and d.shape == m.group(5)]
            if not subject or not other:
                return ""
            if m.group(3) == "above or below":
                return "above" if subject[0].cy < other[0].cy else "below"
            return "left" if subject[0].cx < other[0].cx else "right"
        return ""


def heldout_material(scene: Scene, world: ShapesWorld) -> str | None:
    """What of `scene` the training split never contains: `"object"` when one of its objects is a held-out
    colour/shape combination (the model has never seen that object at all), `"layout"` when only its two-object layout
    is held out (every object seen, never in this arrangement), None when nothing is held out."""
    if any(world.is_heldout_object(o) for o in scene.spec.objects):
        return "object"
    return "layout" if world.is_heldout_layout(scene.spec) else None


def understanding_accuracy(
    answer_fn: AnswerFn, scenes: Sequence[Scene], world: ShapesWorld | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Exact-match accuracy (after `normalize_answer`) of `answer_fn` on every question of `scenes`.

    Returns:
        (summary, items): summary maps each question type, each scene kind (`kind:<name>`), each kind's scenes by
        held-out material (`kind:<name>/heldout-object`, `kind:<name>/heldout-layout`, see `heldout_material`;
        present when such scenes are there) and `overall` to `{"accuracy", "n"}`; items hold one record per question.
    """
    world = world or ShapesWorld()
    items: list[dict[str, Any]] = []
    for scene in scenes:
        image = scene.render(world)
        heldout = heldout_material(scene, world)
        for question, answer, qtype in scene.qa:
            raw = answer_fn(image, question)
            ok = normalize_answer(raw) == answer
            items.append(
                {
                    "kind": scene.spec.kind,
                    "index": scene.index,
                    "novel": scene.novel,
                    "heldout": heldout,
                    "type": qtype,
                    "question": question,
                    "answer": answer,
                    "prediction": raw,
                    "correct": ok,
                }
            )
    groups: dict[str, list[bool]] = {}
    for item in items:
        keys = [item["type"], f"kind:{item['kind']}", "overall"]
        if item["heldout"] is not None:
            keys.append(f"kind:{item['kind']}/heldout-{item['heldout']}")
        for key in keys:
            groups.setdefault(key, []).append(item["correct"])

    # question types first, then the scene kinds each followed by its held-out groups, then overall
    def place(key: str) -> tuple[bool, bool, int]:
        kind = key.split("/")[0].removeprefix("kind:")
        return key == "overall", key.startswith("kind:"), KINDS.index(kind) if kind in KINDS else -1

    order = sorted(groups, key=place)
    summary = {k: {"accuracy": sum(groups[k]) / len(groups[k]), "n": len(groups[k])} for k in order}
    return summary, items


# ------------------------------------------------------------------------------------------------------------------
# the whole evaluation
# ------------------------------------------------------------------------------------------------------------------
def _rate(values: Sequence[bool | None]) -> float | None:
    kept = [bool(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def generation_accuracy(
    generate_fn: GenerateFn,
    scenes: Sequence[Scene],
    seed: int = 0,
    batch_size: int = 8,
    detector: ShapeDetector | None = None,
    specs: Sequence[PromptSpec] | None = None,
    image_dir: str | Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate an image for each scene's caption (in batches; batch `b` gets seed `seed + b`) and score it against
    the scene's spec (or `specs[i]` when given, e.g. mismatched specs).

    Returns:
        (summary, items): summary maps each kind and `overall` (mean over kinds, as GenEval) to the rates of
        `correct` (as `accuracy`), `colour`, `shape`, `count`, `position`, plus `novel_accuracy` on scenes with
        held-out material, split as `heldout_object_accuracy` / `heldout_layout_accuracy` (`heldout_material`,
        with `n_heldout_object` / `n_heldout_layout` scenes).
    """
    detector = detector or ShapeDetector()
    specs = list(specs) if specs is not None else [s.spec for s in scenes]
    items: list[dict[str, Any]] = []
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    for b, start in enumerate(range(0, len(scenes), batch_size)):
        batch = list(scenes[start : start + batch_size])
        prompts = [s.caption for s in batch]
        images = list(generate_fn(prompts, seed + b))
        if len(images) != len(prompts):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(prompts)} prompts")
        for offset, (scene, image) in enumerate(zip(batch, images)):
            spec = specs[start + offset]
            result = match_spec(spec, detector.detect(image))
            heldout = heldout_material(scene, detector.world)
            name = f"{scene.spec.kind}_{scene.index:04d}.png"
            if image_dir is not None:
                image.save(Path(image_dir) / name)
            items.append(
                {
                    "kind": scene.spec.kind,
                    "index": scene.index,
                    "novel": scene.novel,
                    "heldout": heldout,
                    "prompt": scene.caption,
                    "scored_against": spec.caption(),
                    "image": name if image_dir is not None else None,
                    **result,
                }
            )
    summary: dict[str, Any] = {}
    for kind in dict.fromkeys(item["kind"] for item in items):
        rows = [i for i in items if i["kind"] == kind]
        summary[kind] = {
            "accuracy": _rate([r["correct"] for r in rows]),
            "colour": _rate([r["colour"] for r in rows]),
            "shape": _rate([r["shape"] for r in rows]),
            "count": _rate([r["count"] for r in rows]),
            "position": _rate([r["position"] for r in rows]),
            "novel_accuracy": _rate([r["correct"] for r in rows if r["novel"]]),
            "n": len(rows),
            "n_novel": sum(r["novel"] for r in rows),
            "heldout_object_accuracy": _rate([r["correct"] for r in rows if r["heldout"] == "object"]),
            "n_heldout_object": sum(r["heldout"] == "object" for r in rows),
            "heldout_layout_accuracy": _rate([r["correct"] for r in rows if r["heldout"] == "layout"]),
            "n_heldout_layout": sum(r["heldout"] == "layout" for r in rows),
        }
    kinds = [k for k in summary]
    summary["overall"] = {
        "accuracy": sum(summary[k]["accuracy"] for k in kinds) / len(kinds) if kinds else None,
        "n": len(items),
    }
    return summary, items


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of an `evaluate` result."""
    lines = []
    if results.get("config", {}).get("split", "test") != "test":
        lines.append(f"scenes of the {results['config']['split']} distribution (not held out; no targets)")
    gen = results.get("generation")
    if gen:
        lines.append("generation   accuracy  colour  shape   count   position  novel    h.obj    h.layout n")
        for kind, row in gen.items():
            if kind == "overall":
                continue
            lines.append(
                f"  {kind:<10} {_fmt(row['accuracy']):<9} {_fmt(row['colour']):<7} {_fmt(row['shape']):<7} "
                f"{_fmt(row['count']):<7} {_fmt(row['position']):<9} {_fmt(row['novel_accuracy']):<8} "
                f"{_fmt(row['heldout_object_accuracy']):<8} {_fmt(row['heldout_layout_accuracy']):<8} {row['n']}"
            )
        lines.append(f"  {'overall':<10} {_fmt(gen['overall']['accuracy']):<9} (mean over kinds)")
    und = results.get("understanding")
    if und:
        lines.append("understanding                accuracy  n")
        for key, row in und.items():
            lines.append(f"  {key:<26} {_fmt(row['accuracy']):<9} {row['n']}")
    targets = results.get("targets")
    if targets:
        lines.append("targets")
        for key, row in targets.items():
            status = "PASS" if row["passed"] else "FAIL"
            lines.append(f"  {key:<22} {_fmt(row['value'])} >= {row['threshold']}  {status}")
    return "\n".join(lines)


def _check_targets(results: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for path, threshold in TARGETS.items():
        section, key = path.split("/")
        row = (results.get(section) or {}).get(key)
        if row is None:
            continue
        value = row["accuracy"]
        out[path] = {"value": value, "threshold": threshold, "passed": value is not None and value >= threshold}
    return out


def evaluate(
    generate_fn: GenerateFn | None = None,
    answer_fn: AnswerFn | None = None,
    n: int = 50,
    seed: int = 1234,
    world: ShapesWorld | None = None,
    kinds: Sequence[str] = KINDS,
    batch_size: int = 8,
    out_json: str | Path | None = None,
    image_dir: str | Path | None = None,
    detector: ShapeDetector | None = None,
    verbose: bool = True,
    split: str = "test",
) -> dict[str, Any]:
    """ShapesEval on `n` held-out (`test` split) scenes per kind.

    Args:
        generate_fn: `(prompts, seed) -> images`; None skips generation.
        answer_fn: `(image, question) -> answer`; None skips understanding.
        n: scenes per kind; seed: test-split seed (the generation seed of batch b is `seed + b`).
        world: the world (default `ShapesWorld()`); kinds: scene kinds to use.
        batch_size: prompts per `generate_fn` call.
        out_json: where to write the full result (summary + per-item records).
        image_dir: where to save the generated images (optional).
        detector: the `ShapeDetector` (default: built from `world`).
        verbose: print the table.
        split: `"test"` (held-out scenes: the issue's targets) or `"train"`: fresh scenes drawn like the training
            split (its objects and two-object layouts, new pictures from another seed stream than the training
            data's), which tells a model that does not fit its training world from one that fails to generalise;
            the targets are then not checked (`results["targets"]` is empty).

    Returns:
        `{"generation": {kind: {...}, "overall": {...}}, "understanding": {type: {...}}, "targets": {...},
        "config": {...}, "seconds": {...}, "items": {...}}`.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    world = world or ShapesWorld()
    detector = detector or ShapeDetector(world)
    # The training data draws its scenes from seed 0 with the kind left to the world's weights
    # (`make_scene(i, "train", 0)`); a given kind is another random stream, so these pictures are new.
    scenes = [make_scene(i, split, seed, kind, world) for kind in kinds for i in range(n)]
    results: dict[str, Any] = {
        "config": {"n": n, "seed": seed, "split": split, "kinds": list(kinds), "world": world.to_dict()}
    }
    items: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    if generate_fn is not None:
        start = time.perf_counter()
        results["generation"], items["generation"] = generation_accuracy(
            generate_fn, scenes, seed, batch_size, detector, image_dir=image_dir
        )
        seconds["generation"] = round(time.perf_counter() - start, 2)
    if answer_fn is not None:
        start = time.perf_counter()
        results["understanding"], items["understanding"] = understanding_accuracy(answer_fn, scenes, world)
        seconds["understanding"] = round(time.perf_counter() - start, 2)
    results["targets"] = _check_targets(results) if split == "test" else {}
    results["seconds"] = seconds
    if verbose:
        print(format_table(results))
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps({**results, "items": items}, indent=1) + "\n", encoding="utf-8")
    results["items"] = items
    return results


def true_scenes_generate_fn(scenes: Sequence[Scene], world: ShapesWorld | None = None) -> GenerateFn:
    """A `generate_fn` returning the true pictures of `scenes`, in order (the prompts are not read)."""
    world = world or ShapesWorld()
    queue = list(scenes)

    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        return [queue.pop(0).render(world) for _ in prompts]

    return generate


def validate_scorer(
    n: int = 50, seed: int = 1234, world: ShapesWorld | None = None, verbose: bool = True
) -> dict[str, dict[str, float | None]]:
    """Check ShapesEval itself on `n` test scenes per kind.

    - `generation_rendered_prompts`: each prompt parsed and rendered anew (`ground_truth_generate_fn`), expect 1.0;
    - `generation_true_images`: the test scenes' own pictures scored against their prompts, expect 1.0;
    - `generation_mismatched`: the same pictures scored against perturbed prompts (`perturb_spec`), expect 0.0;
    - `understanding_rule_based`: `DetectionAnswerer` on the questions of the pictures, expect 1.0.
    """
    world = world or ShapesWorld()
    detector = ShapeDetector(world)
    truth = evaluate(ground_truth_generate_fn(world), DetectionAnswerer(detector), n, seed, world, verbose=False)
    scenes = [make_scene(i, "test", seed, kind, world) for kind in KINDS for i in range(n)]
    true_images, _ = generation_accuracy(true_scenes_generate_fn(scenes, world), scenes, seed, 8, detector)
    rng = random.Random(f"harmon-shapes/perturb/{seed}")
    wrong = [perturb_spec(scene.spec, rng, world) for scene in scenes]
    mismatched, _ = generation_accuracy(true_scenes_generate_fn(scenes, world), scenes, seed, 8, detector, specs=wrong)
    report = {
        "generation_rendered_prompts": {k: v["accuracy"] for k, v in truth["generation"].items()},
        "generation_true_images": {k: v["accuracy"] for k, v in true_images.items()},
        "generation_mismatched": {k: v["accuracy"] for k, v in mismatched.items()},
        "understanding_rule_based": {k: v["accuracy"] for k, v in truth["understanding"].items()},
    }
    if verbose:
        for section, values in report.items():
            print(f"{section:<28}", " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    return report
