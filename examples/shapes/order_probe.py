#!/usr/bin/env python
"""Can the prompt -> LLM -> MAR decoder path learn which object goes to which side? (the model card's order numbers)

    python examples/shapes/order_probe.py                              # both phrasings, 400 steps (about 4 min)
    python examples/shapes/order_probe.py --phrasing ordered           # left / top object always named first
    python examples/shapes/order_probe.py --phrasing curriculum --ordered-steps 200 --steps 450
    python examples/shapes/order_probe.py --init shipped               # from the shipped weights
    python examples/shapes/order_probe.py --init shipped --linear      # read-out only: is the side already in z?

It trains the path the diffusion head's conditions come from (MAR encoder, LLM, MAR decoder; the shipped model's
architecture, from random weights or the shipped ones) with a direct loss instead of the diffusion one: a linear
layer on each token's condition `z` (empty canvas, every token masked: the first MAR round) must name the object
of that token's half of the picture (18 classes, colour x shape) for two-object prompts of the slots world. A
model that only knows which two objects the prompt names sits at loss ln 2 = 0.69 and token accuracy 0.5; one that
knows their sides goes to 1. It reports the token accuracy and the fraction of prompts with all 16 tokens right,
on 200 new scenes of the train distribution and on 200 held-out test pairs (layouts never trained on). With
`--linear` only the linear layer trains: a linear probe of how much a trained model's conditions already say.

`--phrasing all` (both phrasings, as the recipe trains): the side depends on the word order and the relation word
together; `ordered` (`PromptSpec.ordered`): on the word order alone; `curriculum`: ordered for `--ordered-steps`,
then both.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PHRASINGS = ("all", "ordered", "curriculum")


def side_labels(spec, colours: list[str], shapes: list[str], grid: int = 4) -> torch.Tensor:
    """`(grid * grid,)` class of the object on each token's half: colour index * len(shapes) + shape index."""
    axis, first, second = spec.ordered_pair()
    labels = torch.empty(grid, grid, dtype=torch.long)
    half = grid // 2
    for obj, part in ((first, slice(0, half)), (second, slice(half, grid))):
        value = colours.index(obj.colour) * len(shapes) + shapes.index(obj.shape)
        if axis == "h":
            labels[:, part] = value
        else:
            labels[part, :] = value
    return labels.flatten()


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    from harmon_hf.default_model import default_model_path
    from harmon_hf.modeling_harmon import HarmonForConditionalGeneration
    from harmon_hf.shapes.data import PALETTE, SHAPES, ShapesWorld, make_scene
    from harmon_hf.shapes.run_eval import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phrasing", choices=PHRASINGS, default="all")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--ordered-steps", type=int, default=200, help="curriculum: steps on ordered captions first")
    parser.add_argument("--batch", type=int, default=64, help="prompts per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--init", default="fresh", help="'fresh' (random weights), 'shipped', or a Harmon pipeline folder"
    )
    parser.add_argument("--linear", action="store_true", help="train the linear read-out only (model frozen)")
    parser.add_argument("--layers", type=int, default=0, help="LLM layers of a fresh model (0: the shipped model's)")
    parser.add_argument("--log", type=int, default=50, help="evaluate every this many steps")
    parser.add_argument("--eval-n", type=int, default=200, help="scenes per evaluation split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the history here")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "log", "eval_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.layers < 0:
        parser.error(f"--layers must be 0 or more, got {args.layers}")
    if args.init != "fresh" and args.layers:
        parser.error("--layers builds a fresh model: give it with --init fresh")
    if args.linear and args.init == "fresh":
        parser.error("--linear reads out a trained model: give --init shipped or a folder")
    if args.init not in ("fresh", "shipped") and not (Path(args.init) / "model_index.json").is_file():
        parser.error(f"--init {args.init!r} is neither 'fresh', 'shipped' nor a pipeline folder (no model_index.json)")

    torch.manual_seed(args.seed)
    _, shipped, processor = load_model(default_model_path() if args.init in ("fresh", "shipped") else Path(args.init))
    config = shipped.config
    if args.layers:
        config.text_config.num_hidden_layers = args.layers
        config.text_config.layer_types = ["full_attention"] * args.layers
    model = HarmonForConditionalGeneration(config) if args.init == "fresh" else shipped
    model.train(not args.linear)
    model.requires_grad_(not args.linear)
    colours, shapes = list(PALETTE), list(SHAPES)
    world = ShapesWorld(layout="slots")
    grid = config.image_size // config.image_stride
    classifier = torch.nn.Linear(config.mar_config.decoder_embed_dim, len(colours) * len(shapes))
    params = (
        []
        if args.linear
        else [p for n, p in model.model.named_parameters() if not n.startswith(("vae", "diffusion_head"))]
    )
    params += list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.02)

    def scenes(split: str, start: int, n: int, ordered: bool) -> tuple[list[str], torch.Tensor]:
        specs = [make_scene(start + i, split, seed=7, kind="pair", world=world).spec for i in range(n)]
        specs = [s.ordered() if ordered else s for s in specs]
        return [s.caption() for s in specs], torch.stack([side_labels(s, colours, shapes, grid) for s in specs])

    def logits(prompts: list[str]) -> torch.Tensor:
        batch = processor.build_t2i_prompts(prompts, add_unconditional=False, return_tensors="pt")
        embeds = model.get_input_embeddings()(batch["input_ids"])
        tokens = torch.zeros(len(prompts), grid * grid, config.mar_config.token_dim)
        mask = torch.ones(len(prompts), grid * grid)
        step = model.model.mar_llm_step(tokens, mask, (grid, grid), batch["attention_mask"], prompt_embeds=embeds)
        return classifier(step["z"])

    def measure(split: str) -> tuple[float, float]:
        prompts, labels = scenes(split, 10**6, args.eval_n, ordered=args.phrasing == "ordered")
        model.eval()
        with torch.no_grad():
            right = logits(prompts).argmax(-1) == labels
        model.train(not args.linear)
        return right.float().mean().item(), right.all(-1).float().mean().item()

    history: list[dict[str, float]] = []
    start = time.perf_counter()
    rng = random.Random(args.seed)
    for step in range(1, args.steps + 1):
        ordered = args.phrasing == "ordered" or (args.phrasing == "curriculum" and step <= args.ordered_steps)
        prompts, labels = scenes("train", rng.randrange(10**9), args.batch, ordered)
        loss = F.cross_entropy(logits(prompts).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log == 0 or step == args.steps:
            (train_token, train_all), (test_token, test_all) = measure("train"), measure("test")
            row = dict(step=step, loss=loss.item(), train_token=train_token, train_all=train_all)
            row.update(test_token=test_token, test_all=test_all, seconds=time.perf_counter() - start)
            history.append(row)
            print(
                f"step {step:4d}  loss {row['loss']:.3f}  token / all-16 right: train {train_token:.2f} / "
                f"{train_all:.2f}, held-out {test_token:.2f} / {test_all:.2f}  ({row['seconds']:.0f} s)",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    return history


if __name__ == "__main__":
    main()
