"""ShapesEval on a model folder: what `harmon-hf eval-shapes --model DIR` runs.

Works on any `HarmonPipeline` folder (model/, scheduler/, processor/) or a training output folder (model and
processor side by side), so sampler or training changes can be compared on the same held-out scenes:

- generation: `HarmonPipeline` draws every `test`-split caption (one torch generator per image, seeded by the batch
  seed and the image's place in the batch, so a run is reproducible) and `harmon_hf.shapes.eval` scores the pictures;
- understanding: greedy `model.generate` answers each question about the held-out pictures, given as the chat
  `[image, question]` user turn the model was trained on, and the answers are compared exactly (after
  normalisation).

    from harmon_hf.shapes.run_eval import evaluate_model
    results = evaluate_model("out/harmon-shapes", n=50, out_json="shapes_eval.json")
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data import KINDS, ShapesWorld
from .eval import EVAL_SPLITS, evaluate

__all__ = [
    "WORLD_FILE",
    "add_arguments",
    "evaluate_model",
    "load_model",
    "load_world",
    "make_answer_fn",
    "make_generate_fn",
    "run",
]

# The world a model was trained in, saved beside its weights (`ShapesWorld.to_dict()`) by examples/shapes/train.py.
WORLD_FILE = "shapes_world.json"


def load_world(folder: str | Path) -> ShapesWorld:
    """The `ShapesWorld` of the model in `folder` (its `shapes_world.json`), or the default world when the folder
    has none: the held-out test scenes are drawn in the world the model learned."""
    path = Path(folder) / WORLD_FILE
    if not path.is_file():
        return ShapesWorld()
    try:
        return ShapesWorld.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid Harmon-Shapes world: {err}") from err


def load_model(
    folder: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
):
    """`(pipeline, model, processor)` from a pipeline folder, or from a training output folder (model + processor
    files in one folder, wrapped here in a pipeline with the default `HarmonDDPMScheduler`); the weights in
    `dtype`, the VAE in `vae_dtype`."""
    from ..modeling_harmon import HarmonForConditionalGeneration
    from ..pipeline_harmon import HarmonPipeline, set_vae_dtype
    from ..processing_harmon import HarmonProcessor
    from ..scheduling_harmon import HarmonDDPMScheduler

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        pipe = HarmonPipeline.from_pretrained(folder, dtype=dtype)
    elif (folder / "config.json").is_file():
        model = HarmonForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        processor = HarmonProcessor.from_pretrained(folder)
        pipe = HarmonPipeline(model=model, scheduler=HarmonDDPMScheduler(), processor=processor)
    else:
        raise FileNotFoundError(f"{folder} is neither a HarmonPipeline folder nor a model folder")
    set_vae_dtype(pipe.model, vae_dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.model.eval()
    return pipe, pipe.model, pipe.processor


HEAD_SAMPLERS = ("default", "ddim", "dpm")


def head_scheduler(pipe, sampler: str = "default"):
    """The diffusion head's scheduler for `sampler`: "default" = the folder's own (`HarmonDDPMScheduler`, 100 steps),
    "ddim" / "dpm" = DDIM / DPM-Solver++ on the same noise schedule (`compatible_scheduler`), the fast modes."""
    if sampler not in HEAD_SAMPLERS:
        raise ValueError(f"head sampler must be one of {HEAD_SAMPLERS}, got {sampler!r}")
    if sampler == "default":
        return pipe.scheduler
    name = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}[sampler]
    return pipe.scheduler.compatible_scheduler(name)


def make_generate_fn(
    pipe,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_schedule: str = "constant",
    temperature: float | None = None,
    size: int | None = None,
    sampler: str = "default",
    diffusion_steps: int | None = None,
):
    """`(prompts, seed) -> images` for `shapes.eval.evaluate`: image i of a batch takes its whole randomness from
    `torch.Generator().manual_seed(seed * 1000 + i)`. `num_inference_steps` is capped at the number of image
    tokens here (the pipeline would cap it too, with a warning per call). `sampler` / `diffusion_steps` choose the
    diffusion head's scheduler and its steps per round (see `head_scheduler`; None = the scheduler's default).
    `num_inference_steps`, `guidance_scale`, `temperature`: None = the pipeline folder's (`sampling_defaults`)."""
    num_inference_steps = pipe.resolve_sampling(num_inference_steps)[0]
    side = (size or pipe.default_sample_size) // pipe.model.config.image_stride
    num_inference_steps = min(num_inference_steps, side * side)
    if sampler != "default":  # the same model and processor with the other head scheduler (nothing copied)
        settings = {key: value for key, value in pipe.config.items() if key.startswith("default_")}
        pipe = type(pipe)(
            model=pipe.model, scheduler=head_scheduler(pipe, sampler), processor=pipe.processor, **settings
        )
        pipe.set_progress_bar_config(disable=True)

    def generate(prompts: list[str], seed: int) -> list[Image.Image]:
        generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        return pipe(
            prompts,
            height=size,
            width=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            temperature=temperature,
            generator=generators,
            num_diffusion_steps=diffusion_steps,
        ).images

    return generate


def make_answer_fn(model, processor, max_new_tokens: int = 8):
    """`(image, question) -> answer` for `shapes.eval.evaluate`: one user turn `[image, question]`, greedy decoding.
    The answers are single words, so a few new tokens suffice."""

    @torch.no_grad()
    def answer(image: Image.Image, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[image], return_tensors="pt").to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        # (1, S + new) -> the new tokens only
        return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return answer


def evaluate_model(
    folder: str | Path,
    n: int = 50,
    seed: int = 1234,
    out_json: str | Path | None = None,
    image_dir: str | Path | None = None,
    tasks: Sequence[str] = ("generation", "understanding"),
    kinds: Sequence[str] = KINDS,
    batch_size: int = 8,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_schedule: str = "constant",
    temperature: float | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    verbose: bool = True,
    sampler: str = "default",
    diffusion_steps: int | None = None,
    world: ShapesWorld | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """ShapesEval of the model in `folder` on `n` held-out scenes per kind (see `shapes.eval.evaluate` for the
    result layout); the sampling settings and the folder are added under `results["config"]`. `world`: the world
    of the test scenes (default: the folder's `shapes_world.json`, see `load_world`); `split`: `"test"` (held-out
    scenes) or `"train"` (new scenes of the training distribution; no targets), see `shapes.eval.evaluate`."""
    unknown = set(tasks) - {"generation", "understanding"}
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of ('generation', 'understanding'), got {list(tasks)}")
    if split not in EVAL_SPLITS:  # before the model is loaded
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    if world is None:
        world = load_world(folder)
    pipe, model, processor = load_model(folder, device=device, dtype=dtype, vae_dtype=vae_dtype)
    # None = the folder's sampling defaults (HarmonPipeline.sampling_defaults); the result records what was used
    num_inference_steps, guidance_scale, temperature = pipe.resolve_sampling(
        num_inference_steps, guidance_scale, temperature
    )
    # The world's pictures are drawn at the resolution the model was trained for.
    size = int(model.config.image_size)
    generate_fn = (
        make_generate_fn(
            pipe, num_inference_steps, guidance_scale, guidance_schedule, temperature, size, sampler, diffusion_steps
        )
        if "generation" in tasks
        else None
    )
    answer_fn = make_answer_fn(model, processor) if "understanding" in tasks else None
    results = evaluate(
        generate_fn,
        answer_fn,
        n=n,
        seed=seed,
        world=world,
        kinds=kinds,
        batch_size=batch_size,
        out_json=None,
        image_dir=image_dir,
        verbose=verbose,
        split=split,
    )
    results["config"].update(
        model=str(folder),
        sampling=dict(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            temperature=temperature,
            size=size,
            sampler=sampler,
            diffusion_steps=diffusion_steps,
        ),
        dtype=str(dtype).removeprefix("torch."),
        vae_dtype=str(vae_dtype).removeprefix("torch."),
    )
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


# ------------------------------------------------------------------------------------------------------------------
# command line (the `harmon-hf eval-shapes` subcommand)
# ------------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation options of `harmon-hf eval-shapes` (the CLI adds `--model`, `--device`, `--dtype`, `--vae-dtype`)."""
    parser.add_argument("--n", type=int, default=50, help="scenes per kind (single, pair, count)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the full result (with every item) here")
    parser.add_argument("--images", default=None, metavar="DIR", help="save the generated pictures here")
    parser.add_argument("--seed", type=int, default=1234, help="scene and sampling seed")
    parser.add_argument(
        "--split",
        default="test",
        choices=list(EVAL_SPLITS),
        help="test: held-out scenes (the targets); train: new scenes drawn like the training data (its objects and "
        "layouts), to tell a model that does not fit its world from one that does not generalise",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["generation", "understanding"], choices=["generation", "understanding"]
    )
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="MAR rounds (default: the model folder's, else 64; clamped to the number of image tokens)",
    )
    parser.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the folder's, else 3)"
    )
    parser.add_argument("--guidance-schedule", default="constant", choices=["constant", "linear"])
    parser.add_argument(
        "--temperature", type=float, default=None, help="diffusion-head temperature (default: the folder's, else 1)"
    )
    parser.add_argument(
        "--sampler",
        default="default",
        choices=list(HEAD_SAMPLERS),
        help="diffusion-head scheduler: the folder's (default; upstream's 100-step DDPM) or a faster DDIM / DPM-Solver",
    )
    parser.add_argument(
        "--diffusion-steps", type=int, default=None, help="head steps per MAR round (default: the scheduler's)"
    )


def run(args: argparse.Namespace, folder: str | Path) -> int:
    """Run `evaluate_model` with parsed `add_arguments` options (+ `device`, `dtype`, `vae_dtype`) on `folder`."""
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = evaluate_model(
        folder,
        n=args.n,
        seed=args.seed,
        out_json=args.json,
        image_dir=args.images,
        tasks=args.tasks,
        kinds=args.kinds,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_schedule=args.guidance_schedule,
        temperature=args.temperature,
        sampler=args.sampler,
        diffusion_steps=args.diffusion_steps,
        split=args.split,
        device=device,
        dtype=getattr(torch, args.dtype),
        vae_dtype=getattr(torch, getattr(args, "vae_dtype", "float32")),
    )
    if args.json:
        print(f"wrote {args.json}")
    return 0 if results else 1
