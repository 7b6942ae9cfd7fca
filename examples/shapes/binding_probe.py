#!/usr/bin/env python
"""Does the prompt tell the diffusion head which object goes in which slot? (the model card's binding numbers)

    python examples/shapes/binding_probe.py                      # the shipped model
    python examples/shapes/binding_probe.py --model OUT/harmon-shapes --colours red blue --shapes circle square

For a two-object prompt "A to the left of B" it computes the head's conditions `z` on an empty canvas (every token
masked, the first MAR round) and compares them, slot by slot, with those of three other prompts: the same objects
with the other relation word ("A to the right of B": the objects swap places), the swapped phrasing ("B to the left
of A": also swapped) and the other axis ("A above B"). A model that binds objects to slots changes `z` on a slot as
much for a swap as for a change of axis; one that does not changes it only for the axis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def slot_conditions(model, processor, prompts: list[str]) -> torch.Tensor:
    """`z` `(P, m, n, dec)` of each prompt on an empty canvas (every token masked)."""
    batch = processor.build_t2i_prompts(prompts, add_unconditional=False, return_tensors="pt")
    m = n = model.config.image_size // model.config.image_stride
    tokens = torch.zeros(len(prompts), m * n, model.config.mar_config.token_dim)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        step = model.model.mar_llm_step(
            tokens, torch.ones(len(prompts), m * n), (m, n), batch["attention_mask"], prompt_embeds=embeds
        )
    return step["z"].reshape(len(prompts), m, n, -1)


def probe(model, processor, first: str, second: str) -> dict[str, dict[str, float]]:
    """Relative change of the left / right half's conditions from "`first` to the left of `second`" to each
    comparison prompt (`|z - z_ref| / |z_ref|` over the half's tokens)."""
    prompts = {
        "reference": f"{first} to the left of {second}",
        "other relation word (objects swap)": f"{first} to the right of {second}",
        "swapped phrasing (objects swap)": f"{second} to the left of {first}",
        "same meaning, other phrasing": f"{second} to the right of {first}",
        "other axis": f"{first} above {second}",
    }
    z = slot_conditions(model, processor, list(prompts.values()))
    half = z.shape[2] // 2
    parts = {"left": z[:, :, :half].flatten(1), "right": z[:, :, half:].flatten(1)}
    return {
        name: {side: float((part[i] - part[0]).norm() / part[0].norm()) for side, part in parts.items()}
        for i, name in enumerate(prompts)
        if i > 0
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    from harmon_hf.default_model import default_model_path
    from harmon_hf.shapes.data import PALETTE, SHAPES
    from harmon_hf.shapes.run_eval import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    parser.add_argument("--colours", nargs=2, default=["red", "blue"], choices=list(PALETTE))
    parser.add_argument("--shapes", nargs=2, default=["circle", "square"], choices=list(SHAPES))
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    first, second = (f"a {c} {s}" for c, s in zip(args.colours, args.shapes))
    if first == second:
        parser.error(f"the two objects must differ, got {first!r} twice")
    folder = Path(args.model) if args.model else default_model_path()
    _, model, processor = load_model(folder)
    result = probe(model, processor, first, second)
    print(f'change of z from "{first} to the left of {second}"   left slot   right slot')
    for name, change in result.items():
        print(f"  {name:36s} {change['left']:9.3f}   {change['right']:9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
