"""The `harmon-hf` command line.

    harmon-hf generate "a red circle" -o out.png        # text -> image (embedded default model)
    harmon-hf caption out.png                            # image -> text
    harmon-hf chat --model DIR                           # interactive chat about images
    harmon-hf convert --checkpoint ... --vae ... --llm ... --output DIR
    harmon-hf generate-batch prompts.jsonl --model DIR --out DIR
    harmon-hf eval-shapes --model DIR --n 50 --json eval.json   # ShapesEval

Every subcommand takes `--model DIR` (a folder written by `harmon-hf convert` or `save_pretrained`); without it the
model embedded in the package is used. Errors are printed as one line and exit with a non-zero status (set
`HARMON_HF_DEBUG=1` to get the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """examples:
  harmon-hf generate "a red circle" -o circle.png --seed 0
  harmon-hf caption circle.png --prompt "What colour is the shape?"
  harmon-hf chat --image circle.png
  harmon-hf convert --checkpoint harmon_0.5b.pth --vae kl16.ckpt --llm Qwen2.5-0.5B-Instruct --output harmon-0.5b
  harmon-hf generate "a cat" --model harmon-0.5b --size 512 --steps 64 --guidance 3.0 -o cat.png
  harmon-hf generate-batch geneval_prompts.jsonl --model harmon-1.5b --out geneval/ --num-images 4
  accelerate launch --num_processes 8 -m harmon_hf.cli generate-batch prompts.jsonl --model harmon-1.5b --out out/

Without --model the model in $HARMON_MODEL, else the one embedded in the package (Harmon-Shapes), is used.
Run 'harmon-hf COMMAND --help' for the options of a command."""

GENERATE_EPILOG = """examples:
  harmon-hf generate "a red circle" -o circle.png --seed 0
  harmon-hf generate "a red cube on a blue table" --model harmon-1.5b --size 512 --seed 1 -o cube.png
  harmon-hf generate "a green square" --num-images 4 --seed 0 -o squares.png   # squares_0.png .. squares_3.png
  harmon-hf generate "a wide landscape" --model harmon-1.5b --height 384 --width 768 --guidance 4 --temperature 0.9

Image i of --num-images N uses torch.Generator().manual_seed(SEED + i), so image 0 is what
HarmonPipeline(..., generator=torch.Generator().manual_seed(SEED)) draws."""

BATCH_EPILOG = """prompt files:
  .jsonl  one JSON object per line with a "prompt" (or "text"/"caption") key, e.g. GenEval's
          evaluation_metadata.jsonl; a line may also be a bare JSON string
  .txt    one prompt per line (empty lines are skipped)

output (the GenEval layout):
  OUT/00000/metadata.jsonl          the prompt's JSON line, as given
  OUT/00000/samples/0000.png ...    --num-images samples
  OUT/generate_batch.json           the sampling settings; a rerun must use the same ones

Finished prompts are skipped, so an interrupted run resumes where it stopped. Image j of prompt k uses
torch.Generator().manual_seed(SEED + k * NUM_IMAGES + j): the result does not depend on the number of processes
or the batch size, and `harmon-hf generate PROMPT --seed (SEED + k * NUM_IMAGES) --num-images NUM_IMAGES` redraws
prompt k's samples.

examples:
  harmon-hf generate-batch prompts.jsonl --model harmon-1.5b --out geneval/ --num-images 4 --seed 0
  accelerate launch --num_processes 8 -m harmon_hf.cli generate-batch prompts.jsonl --model harmon-1.5b --out geneval/
  accelerate launch --cpu --num_processes 2 -m harmon_hf.cli generate-batch prompts.txt --out out/ --steps 16
  torchrun --nproc_per_node 4 -m harmon_hf.cli generate-batch prompts.jsonl --model harmon-1.5b --out geneval/"""

CAPTION_EPILOG = """examples:
  harmon-hf caption photo.png
  harmon-hf caption photo.png --prompt "What colour is the shape?" --max-new-tokens 16
  harmon-hf caption photo.jpg --model harmon-1.5b --device cuda --dtype bfloat16"""

CHAT_EPILOG = """commands inside the chat:
  :image PATH   attach an image to your next message (several are allowed)
  :reset        forget the conversation and its images
  :quit         leave (end of input works too)

examples:
  harmon-hf chat --image photo.png
  printf 'What is in the picture?\\nWhat colour is it?\\n' | harmon-hf chat --image photo.png --model harmon-1.5b"""

CONVERT_EPILOG = """examples:
  harmon-hf convert --checkpoint harmon_1.5b.pth --vae kl16.ckpt --llm Qwen2.5-1.5B-Instruct --output harmon-1.5b \\
      --dtype bfloat16
  harmon-hf convert --checkpoint harmon_0.5b.pth --vae kl16.ckpt --llm Qwen2.5-0.5B-Instruct --output harmon-0.5b

See docs/converting.md for where to download the upstream files."""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (with a pointer to --help) instead of the usage block."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------------------------------------------
# argument types and shared options
# ----------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _pixels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in pixels, got {text!r}") from None
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"sizes must be a positive multiple of 16 (the VAE stride), got {value}")
    return value


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"guidance must be >= 1 (1 turns guidance off), got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"temperature must be >= 0, got {value}")
    return value


def resolve_model(model: str | None) -> Path:
    """`--model` or `HARMON_MODEL`, else the embedded default model folder; checked to look like a Harmon folder."""
    from .default_model import default_model_path

    value = model or os.environ.get("HARMON_MODEL")
    if value is None:
        return default_model_path()
    path = Path(value)
    if not path.is_dir():
        raise CLIError(f"model folder not found: {path} (no network: pass a local folder)")
    if not ((path / "model_index.json").is_file() or (path / "config.json").is_file()):
        raise CLIError(
            f"{path} is not a Harmon model folder (no model_index.json or config.json); "
            "make one with 'harmon-hf convert'"
        )
    return path


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=None, metavar="DIR", help="model folder (default: $HARMON_MODEL or the embedded model)"
    )
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default float32; the VAE keeps its own, see --vae-dtype)",
    )
    group.add_argument(
        "--vae-dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the VAE's dtype (default float32; bfloat16 decodes faster on GPUs and CPUs with AMX, for pictures "
        "that differ by rounding: docs/performance.md)",
    )


def _add_sampling_args(parser: argparse.ArgumentParser, default_seed: int | None) -> None:
    group = parser.add_argument_group("sampling")
    seed_help = "random seed (default: a random one, printed)" if default_seed is None else "base random seed"
    group.add_argument("--seed", type=int, default=default_seed, help=seed_help)
    group.add_argument(
        "--guidance",
        type=_guidance,
        default=None,
        help="classifier-free guidance scale, >= 1 (1 = off; default: the model folder's, else 3)",
    )
    group.add_argument("--guidance-schedule", default="constant", choices=["constant", "linear"], help="CFG schedule")
    group.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="MAR rounds (default: the model folder's, else 64; clamped to the number of image tokens)",
    )
    group.add_argument(
        "--diffusion-steps",
        type=_positive_int,
        default=None,
        help="diffusion-head steps per MAR round (default: the scheduler's, 100)",
    )
    group.add_argument(
        "--temperature",
        type=_temperature,
        default=None,
        help="diffusion-head sampling temperature (default: the model folder's, else 1)",
    )
    group.add_argument(
        "--size", type=_pixels, default=None, help="height and width in pixels, a multiple of 16 (default: the model's)"
    )
    group.add_argument("--height", type=_pixels, default=None, help="height in pixels (overrides --size)")
    group.add_argument("--width", type=_pixels, default=None, help="width in pixels (overrides --size)")
    group.add_argument("--negative-prompt", default=None, help="replaces the unconditional prompt of guidance")


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _quiet_loading() -> None:
    """No weight-loading progress bars (the generation progress bar stays)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_pipeline(folder: Path, device: str, dtype: str, vae_dtype: str = "float32"):
    """A `HarmonPipeline` on `device` from a pipeline folder or a flat (training output) folder; the weights in
    `dtype`, the VAE in `vae_dtype` (torch dtype names)."""
    import torch

    from .pipeline_harmon import HarmonPipeline, set_vae_dtype

    _quiet_loading()
    pipe = HarmonPipeline.from_pretrained(folder, dtype=getattr(torch, dtype))
    set_vae_dtype(pipe.model, getattr(torch, vae_dtype))
    pipe.to(device)
    pipe.model.eval()
    return pipe


def _generators(seeds: Sequence[int]) -> list:
    import torch

    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        height=args.height or args.size,
        width=args.width or args.size,
        num_inference_steps=args.steps,
        num_diffusion_steps=args.diffusion_steps,
        guidance_scale=args.guidance,
        guidance_schedule=args.guidance_schedule,
        temperature=args.temperature,
        negative_prompt=args.negative_prompt,
    )


def _save_image(image, path: Path) -> None:
    """Save atomically (a partly written file never has the final name)."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    image.save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    """`harmon-hf generate`: one prompt -> `--num-images` PNG files."""
    from PIL import Image

    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    out = Path(args.output)
    if out.suffix.lower().lstrip(".") not in {ext.lstrip(".") for ext in Image.registered_extensions()}:
        raise CLIError(f"unknown image file extension for --output: {out} (use .png or .jpg)")
    folder = resolve_model(args.model)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    pipe = load_pipeline(folder, _device(args.device), args.dtype, args.vae_dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    result = pipe(
        args.prompt,
        num_images_per_prompt=args.num_images,
        generator=_generators([seed + i for i in range(args.num_images)]),
        **_sampling_kwargs(args),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        image.save(path)
        paths.append(str(path))
    print(f"saved {', '.join(paths)} (seed {seed})")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# generate-batch
# ----------------------------------------------------------------------------------------------------------------
def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Prompt records from a `.jsonl` (objects with a "prompt"/"text"/"caption" key, or strings) or `.txt` file.

    Every record is returned as a dict with a "prompt" key (other keys, e.g. GenEval's "tag"/"include", are kept).
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"prompt file not found: {path}")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix.lower() == ".txt":
                records.append({"prompt": line})
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{path}:{lineno}: not valid JSON ({err.msg}); use .txt for plain prompts") from None
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict):
                raise CLIError(f"{path}:{lineno}: expected a JSON object or string, got {type(item).__name__}")
            if "prompt" not in item:
                key = next((k for k in ("text", "caption") if isinstance(item.get(k), str)), None)
                if key is None:
                    raise CLIError(f"{path}:{lineno}: no 'prompt' (or 'text'/'caption') key")
                item = {"prompt": item[key], **item}
            if not isinstance(item["prompt"], str) or not item["prompt"].strip():
                raise CLIError(f"{path}:{lineno}: the prompt is empty or not a string")
            records.append(item)
    if not records:
        raise CLIError(f"{path} holds no prompts")
    return records


def _missing_samples(folder: Path, num_images: int) -> list[int] | None:
    """Sample indices still to draw for one prompt folder; `None` when it is finished (metadata.jsonl and every
    sample exist). An empty list means only metadata.jsonl is missing (a run stopped right before writing it)."""
    samples = folder / "samples"
    missing = [j for j in range(num_images) if not (samples / f"{j:04d}.png").is_file()]
    if not missing and (folder / "metadata.jsonl").is_file():
        return None
    return missing


def _check_batch_settings(out: Path, settings: dict[str, Any]) -> None:
    """Check that an earlier run into `out` (its `generate_batch.json`) used the same settings."""
    path = out / "generate_batch.json"
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        previous = {}
    if previous != settings:
        changed = sorted(k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k))
        raise CLIError(
            f"{out} was started with other settings ({', '.join(changed)} differ); "
            "resume with the same options or use a new --out folder"
        )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _use_cpu(device: str | None) -> bool:
    """Whether accelerate should set up CPU processes (gloo): `--device cpu`, `accelerate launch --cpu`, or no
    CUDA device; `PartialState` otherwise treats a torchrun/accelerate launch without GPUs as a single process."""
    import torch

    if device is not None:
        return device == "cpu"
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def cmd_generate_batch(args: argparse.Namespace) -> int:
    """`harmon-hf generate-batch`: a prompt file -> GenEval-style folders, resumable, split across processes."""
    from accelerate import PartialState

    records = read_prompt_file(args.prompts)
    folder = resolve_model(args.model)
    out = Path(args.out)
    state = PartialState(cpu=_use_cpu(args.device))
    rank, world = state.process_index, state.num_processes
    n = args.num_images
    settings = {
        "model": str(folder.resolve()),
        "num_prompts": len(records),
        "num_images": n,
        "seed": args.seed,
        "seed_rule": "torch.Generator().manual_seed(seed + prompt_index * num_images + sample_index)",
        "dtype": args.dtype,
        "vae_dtype": args.vae_dtype,
        **_sampling_kwargs(args),
    }
    # every process checks the settings and computes the same to-do list before anything is written
    _check_batch_settings(out, settings)
    todo = [(k, _missing_samples(out / f"{k:05d}", n)) for k in range(len(records))]
    todo = [(k, missing) for k, missing in todo if missing is not None]
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "generate_batch.json").is_file():
            _write_json(out / "generate_batch.json", settings)
        print(
            f"{len(records)} prompts: {len(records) - len(todo)} already done, {len(todo)} to draw on {world} "
            f"process(es) -> {out}",
            flush=True,
        )
    mine = todo[rank::world]

    pipe = None
    if any(missing for _, missing in mine):
        pipe = load_pipeline(folder, args.device or str(state.device), args.dtype, args.vae_dtype)
        pipe.set_progress_bar_config(disable=True)
    sampling = _sampling_kwargs(args)

    # batches of prompts that miss the same samples (normally all of them), `--batch-size` prompts per call
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, missing in mine:
        groups.setdefault(tuple(missing), []).append(k)
    done = 0
    for missing, ks in groups.items():
        for start in range(0, len(ks), args.batch_size):
            batch = ks[start : start + args.batch_size]
            images = []
            if missing:
                seeds = [args.seed + k * n + j for k in batch for j in missing]
                images = pipe(
                    [records[k]["prompt"] for k in batch],
                    num_images_per_prompt=len(missing),
                    generator=_generators(seeds),
                    **sampling,
                ).images
            for b, k in enumerate(batch):
                prompt_dir = out / f"{k:05d}"
                (prompt_dir / "samples").mkdir(parents=True, exist_ok=True)
                for i, j in enumerate(missing):
                    _save_image(images[b * len(missing) + i], prompt_dir / "samples" / f"{j:04d}.png")
                # written last: its presence marks the prompt as finished
                meta = prompt_dir / ".metadata.jsonl.tmp"
                meta.write_text(json.dumps(records[k], ensure_ascii=False) + "\n", encoding="utf-8")
                os.replace(meta, prompt_dir / "metadata.jsonl")
                done += 1
                print(f"[{rank}/{world}] {k:05d} done ({done}/{len(mine)}): {records[k]['prompt'][:60]}", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"finished: {len(records)} prompts in {out}", flush=True)
    if state.use_distributed:
        state.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# understanding: caption and chat
# ----------------------------------------------------------------------------------------------------------------
def load_understanding(folder: Path, device: str, dtype: str, vae_dtype: str = "float32"):
    """`(model, processor)` from a pipeline folder (`model/`, `processor/`) or a flat folder; the weights in
    `dtype`, the VAE (which encodes the pictures) in `vae_dtype`."""
    import torch

    from .modeling_harmon import HarmonForConditionalGeneration
    from .pipeline_harmon import set_vae_dtype
    from .processing_harmon import HarmonProcessor

    _quiet_loading()
    sub = "model" if (folder / "model").is_dir() else None
    psub = "processor" if (folder / "processor").is_dir() else None
    model = HarmonForConditionalGeneration.from_pretrained(folder, subfolder=sub, dtype=getattr(torch, dtype))
    processor = HarmonProcessor.from_pretrained(folder, subfolder=psub)
    set_vae_dtype(model, getattr(torch, vae_dtype))
    return model.to(device).eval(), processor


def answer(model, processor, messages: list[dict], images: list, max_new_tokens: int = 64, streamer=None) -> str:
    """Greedy answer of the assistant to a conversation (`messages` in the chat-template format)."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=images or None, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def open_image(path: str | Path):
    """An RGB `PIL.Image` from a file, or a one-line `CLIError` naming the file."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except Exception as err:
        raise CLIError(f"cannot read image {p}: {err}") from None


def cmd_caption(args: argparse.Namespace) -> int:
    """`harmon-hf caption`: one image (+ question) -> text."""
    image = open_image(args.image)
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    model, processor = load_understanding(resolve_model(args.model), _device(args.device), args.dtype, args.vae_dtype)
    content = [{"type": "image"}, {"type": "text", "text": args.prompt}]
    print(answer(model, processor, [{"role": "user", "content": content}], [image], args.max_new_tokens))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """`harmon-hf chat`: a multi-turn conversation on stdin/stdout (works with piped input)."""
    from transformers import TextStreamer

    pending: list = [open_image(p) for p in args.image or []]
    model, processor = load_understanding(resolve_model(args.model), _device(args.device), args.dtype, args.vae_dtype)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages: list[dict] = []
    images: list = []
    print("Chat with Harmon. Type ':image PATH' to add an image, ':reset' to start over, ':quit' to leave.")
    if pending:
        print(f"({len(pending)} image(s) attached to your first message)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in (":quit", ":q", ":exit", "exit"):
            return 0
        if line == ":reset":
            messages, images, pending = [], [], []
            print("(conversation cleared)")
            continue
        if line.startswith(":image"):
            try:
                pending.append(open_image(line[len(":image") :].strip()))
                print(f"(image added; {len(pending)} pending for your next message)")
            except CLIError as err:
                print(f"error: {err}")
            continue
        if line.startswith(":"):
            print(f"error: unknown command {line.split()[0]!r} (commands: :image PATH, :reset, :quit)")
            continue
        if not line:
            continue
        content = [{"type": "image"} for _ in pending] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": content})
        images.extend(pending)
        pending = []
        print("harmon> ", end="", flush=True)
        reply = answer(model, processor, messages, images, args.max_new_tokens, streamer=streamer)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})


# ----------------------------------------------------------------------------------------------------------------
# convert, eval-shapes
# ----------------------------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import run

    return run(args)


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from .shapes.run_eval import run

    return run(args, resolve_model(args.model))


# Help for options that other modules add without one (so that every option of every command is explained).
_FALLBACK_HELP = {
    "dtype": "dtype of the weights (default %(default)s)",
    "tasks": "what to evaluate (default: %(default)s)",
    "kinds": "scene kinds to evaluate (default: %(default)s)",
    "guidance_schedule": "classifier-free guidance schedule (default %(default)s)",
    "temperature": "diffusion-head sampling temperature (default %(default)s)",
}


def _fill_missing_help(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.help is None and action.dest in _FALLBACK_HELP:
            action.help = _FALLBACK_HELP[action.dest]


def build_parser() -> argparse.ArgumentParser:
    """The `harmon-hf` argument parser with all subcommands."""
    parser = _ArgumentParser(
        prog="harmon-hf",
        description="Harmon (unified image understanding + generation) for transformers and diffusers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("generate", "text -> image", "Generate images from a prompt and save them as PNG files.", GENERATE_EPILOG)
    p.add_argument("prompt", help="what to draw")
    p.add_argument(
        "-o", "--output", default="out.png", help="output image (default out.png); several images get _0, _1, ..."
    )
    p.add_argument("--num-images", type=_positive_int, default=1, help="images for the prompt (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sampling_args(p, default_seed=None)
    _add_model_arg(p)
    p.set_defaults(func=cmd_generate)

    p = add(
        "generate-batch",
        "prompt file -> image folders (GenEval layout)",
        "Generate samples for every prompt of a file into one folder per prompt (the GenEval layout); resumable, "
        "and split across processes when started with 'accelerate launch' or 'torchrun'.",
        BATCH_EPILOG,
    )
    p.add_argument("prompts", help="prompt file (.jsonl or .txt)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--num-images", type=_positive_int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="prompts per pipeline call (default 1)")
    _add_sampling_args(p, default_seed=0)
    _add_model_arg(p)
    p.set_defaults(func=cmd_generate_batch)

    p = add("caption", "image -> text", "Describe an image, or answer a question about it.", CAPTION_EPILOG)
    p.add_argument("image", help="image file")
    p.add_argument("--prompt", default="Describe the image.", help="question or instruction (default: describe)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="answer length limit (default 64)")
    _add_model_arg(p)
    p.set_defaults(func=cmd_caption)

    p = add(
        "chat",
        "interactive chat about images",
        "Multi-turn chat on the terminal (or piped stdin), answers streamed; ':image PATH' attaches an image.",
        CHAT_EPILOG,
    )
    p.add_argument("--image", action="append", metavar="PATH", help="image for the first message (repeatable)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="answer length limit (default 128)")
    _add_model_arg(p)
    p.set_defaults(func=cmd_chat)

    from .convert import add_arguments

    p = add(
        "convert",
        "convert upstream checkpoints",
        "Convert harmon_*.pth + kl16.ckpt + a Qwen2.5 folder into a harmon-hf pipeline folder.",
        CONVERT_EPILOG,
    )
    add_arguments(p)
    _fill_missing_help(p)
    p.set_defaults(func=cmd_convert)

    from .shapes.run_eval import add_arguments as add_eval_arguments

    p = sub.add_parser(
        "eval-shapes",
        help="ShapesEval: generation and understanding accuracy",
        description="ShapesEval on held-out Harmon-Shapes scenes: generation accuracy (pictures scored by colour, "
        "shape, position and count) and understanding exact-match accuracy. Prints a table; --json writes it all.",
        epilog="example: harmon-hf eval-shapes --model out/harmon-shapes --n 50 --json shapes_eval.json",
    )
    _add_model_arg(p)
    add_eval_arguments(p)
    _fill_missing_help(p)
    p.set_defaults(func=cmd_eval_shapes)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (CLIError, ValueError, OSError)) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of `harmon-hf`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("HARMON_HF_DEBUG"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
