"""Harmon-Shapes: a synthetic world of coloured shapes to train and evaluate a tiny Harmon on CPU.

- `data`: the deterministic scene generator (captions, question/answer pairs, held-out splits, dataset writer);
- `tokenizer`: a ~500-token byte-level BPE tokenizer with Qwen2.5 conventions;
- `vae`: a small kl16-layout `AutoencoderKL` and its CPU training loop (imports torch and diffusers);
- `eval`: ShapesEval, the generation scorer and understanding accuracy behind `evaluate(...)`.

Only `data` is imported here; import the other modules explicitly.
"""

from .data import (
    KINDS,
    PALETTE,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapesWorld,
    iter_scenes,
    make_scene,
    parse_prompt,
    write_dataset,
)

__all__ = [
    "KINDS",
    "PALETTE",
    "SHAPES",
    "ObjectSpec",
    "PromptSpec",
    "Scene",
    "ShapesWorld",
    "iter_scenes",
    "make_scene",
    "parse_prompt",
    "write_dataset",
]
