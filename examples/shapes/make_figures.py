"""Draw the README / model-card pictures with a Harmon-Shapes model (default: the embedded one).

    python examples/shapes/make_figures.py --out docs/images

Writes OUT/harmon-shapes-red-circle.png (what `harmon-hf generate "a red circle" -o red_circle.png --seed 0` draws),
OUT/harmon-shapes-generation.png (a grid: one prompt per column, seeds 0-2 down the rows, each picture upscaled
x2 with its prompt above) and OUT/harmon-shapes-understanding.png (held-out test pictures with the model's answers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from harmon_hf.default_model import default_model_path
from harmon_hf.shapes.data import make_scene
from harmon_hf.shapes.run_eval import load_model, load_world, make_answer_fn

PROMPTS: tuple[str, ...] = (
    "a red circle",
    "a blue square",
    "a yellow triangle",
    "a purple circle",  # held out of training as an object
    "a green square to the left of a cyan circle",
    "a red triangle above a blue circle",
    "two yellow squares",
    "three purple triangles",
)
QUESTIONS: tuple[str, ...] = ("Describe the image.", "What color is the shape?", "What shape is it?")


def wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap to at most `width` characters per line."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def labelled(image: Image.Image, lines: list[str], scale: int = 2, line_height: int = 11) -> Image.Image:
    """`image` upscaled `scale` times (nearest) under a white band holding `lines`."""
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    band = line_height * len(lines) + 4
    canvas = Image.new("RGB", (big.width, big.height + band), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((3, 2 + i * line_height), line, fill=(0, 0, 0))
    canvas.paste(big, (0, band))
    return canvas


def grid(cells: list[list[Image.Image]], pad: int = 4) -> Image.Image:
    """Rows of equally sized cells -> one picture with `pad` px of white between them."""
    h, w = cells[0][0].height, cells[0][0].width
    out = Image.new("RGB", (len(cells[0]) * (w + pad) + pad, len(cells) * (h + pad) + pad), "white")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            out.paste(cell, (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def stack(cells: list[Image.Image], pad: int = 4) -> Image.Image:
    """Cells of one width one above the other, `pad` px apart."""
    out = Image.new("RGB", (cells[0].width, sum(c.height for c in cells) + pad * (len(cells) - 1)), "white")
    y = 0
    for cell in cells:
        out.paste(cell, (0, y))
        y += cell.height + pad
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and draw the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--seeds", type=int, default=3, help="pictures per prompt")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = args.model or default_model_path()
    pipe, model, processor = load_model(folder)

    # The README command's picture: same call as `harmon-hf generate` with its defaults.
    pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0].save(
        out / "harmon-shapes-red-circle.png"
    )

    columns = []
    for prompt in PROMPTS:
        images = [pipe(prompt, generator=torch.Generator().manual_seed(s)).images[0] for s in range(args.seeds)]
        lines = wrap(prompt, 21)
        lines += [""] * (3 - len(lines))  # the same band height in every column
        columns.append(stack([labelled(images[0], lines)] + [labelled(im, []) for im in images[1:]]))
    grid([columns]).save(out / "harmon-shapes-generation.png", optimize=True)

    answer = make_answer_fn(model, processor, max_new_tokens=16)
    world = load_world(folder)  # held-out pictures of the world the model was trained in
    cells = []
    for i, kind in enumerate(("single", "single", "pair", "count")):
        scene = make_scene(i, "test", 1234, kind, world)
        image = scene.render(world)
        questions = [QUESTIONS[0]] + [q for q, _, _ in scene.qa[:2]]
        lines = []
        for q in questions:
            lines += wrap(f"Q: {q}", 30) + wrap(f"A: {answer(image, q)}", 30)
        cells.append(labelled(image, lines, scale=3))
    height = max(c.height for c in cells)
    padded = []
    for cell in cells:
        canvas = Image.new("RGB", (cell.width, height), "white")
        canvas.paste(cell, (0, 0))
        padded.append(canvas)
    grid([padded]).save(out / "harmon-shapes-understanding.png", optimize=True)
    print(f"figures -> {out}")


if __name__ == "__main__":
    main()
