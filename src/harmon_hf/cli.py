"""The `harmon-hf` command line.

    harmon-hf generate "a red circle" -o out.png        # text -> image (embedded default model)
    harmon-hf caption out.png                            # image -> text
    harmon-hf chat --model DIR                           # interactive chat about images
    harmon-hf convert --checkpoint ... --vae ... --llm ... --output DIR
    harmon-hf generate-batch prompts.jsonl --model DIR --out DIR

Every subcommand takes `--model DIR` (a folder written by `harmon-hf convert` or `save_pretrained`); without it the
model embedded in the package is used. Errors are printed as one line and exit with a non-zero status.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """examples:
  harmon-hf generate "a red circle" -o circle.png --seed 0
  harmon-hf caption circle.png --prompt "What colour is the shape?"
  harmon-hf convert --checkpoint harmon_0.5b.pth --vae kl16.ckpt --llm Qwen2.5-0.5B-Instruct --output harmon-0.5b
  harmon-hf generate "a cat" --model harmon-0.5b --size 512 --steps 64 --guidance 3.0 -o cat.png
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def resolve_model(model: str | None) -> Path:
    """`--model` or `HARMON_MODEL`, else the embedded default model folder."""
    from .default_model import default_model_path

    value = model or os.environ.get("HARMON_MODEL")
    if value is None:
        return default_model_path()
    path = Path(value)
    if not path.is_dir():
        raise CLIError(f"model folder not found: {path} (no network: pass a local folder)")
    return path


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: $HARMON_MODEL or the embedded model)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .pipeline_harmon import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(resolve_model(args.model), dtype=getattr(torch, args.dtype))
    pipe.to(_device(args.device))
    pipe.set_progress_bar_config(disable=args.quiet)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    size = args.size
    result = pipe(
        args.prompt,
        height=args.height or size,
        width=args.width or size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_schedule=args.guidance_schedule,
        temperature=args.temperature,
        num_images_per_prompt=args.num_images,
        generator=generator,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        image.save(path)
        paths.append(str(path))
    print("saved " + ", ".join(paths))
    return 0


def _load_understanding(args: argparse.Namespace):
    import torch

    from .modeling_harmon import HarmonForConditionalGeneration
    from .processing_harmon import HarmonProcessor

    folder = resolve_model(args.model)
    sub = "model" if (folder / "model").is_dir() else None
    psub = "processor" if (folder / "processor").is_dir() else None
    model = HarmonForConditionalGeneration.from_pretrained(folder, subfolder=sub, dtype=getattr(torch, args.dtype))
    processor = HarmonProcessor.from_pretrained(folder, subfolder=psub)
    return model.to(_device(args.device)).eval(), processor


def answer(model, processor, messages: list[dict], images: list, max_new_tokens: int = 64, streamer=None) -> str:
    """Greedy answer of the assistant to a conversation (`messages` in the chat-template format)."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=images or None, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _open_image(path: str):
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except Exception as err:
        raise CLIError(f"cannot read image {p}: {err}") from None


def cmd_caption(args: argparse.Namespace) -> int:
    image = _open_image(args.image)
    model, processor = _load_understanding(args)
    content = [{"type": "image"}, {"type": "text", "text": args.prompt}]
    print(answer(model, processor, [{"role": "user", "content": content}], [image], args.max_new_tokens))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    model, processor = _load_understanding(args)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages: list[dict] = []
    images: list = []
    print("Chat with Harmon. Type ':image PATH' to add an image, ':reset' to start over, ':quit' to leave.")
    pending: list = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if line in (":quit", ":q", "exit"):
            return 0
        if line == ":reset":
            messages, images, pending = [], [], []
            continue
        if line.startswith(":image "):
            try:
                pending.append(_open_image(line[7:].strip()))
                print(f"(image added; {len(pending)} pending for your next message)")
            except CLIError as err:
                print(f"error: {err}")
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


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmon-hf",
        description="Harmon (unified image understanding + generation) for transformers and diffusers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="text -> image",
        description="Generate an image from a prompt.",
        epilog='example: harmon-hf generate "a red circle" -o circle.png --seed 0',
    )
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="out.png", help="output image (PNG); several images get _0, _1, ...")
    _add_model_arg(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-schedule", default="constant", choices=["constant", "linear"])
    p.add_argument("--steps", type=int, default=64, help="MAR rounds (clamped to the number of image tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="diffusion-head sampling temperature")
    p.add_argument("--size", type=int, default=None, help="height and width in pixels (multiple of 16)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "caption",
        help="image -> text",
        description="Describe an image, or answer a question about it.",
        epilog='example: harmon-hf caption photo.png --prompt "What colour is the shape?"',
    )
    p.add_argument("image", help="image file")
    p.add_argument("--prompt", default="Describe the image.", help="question or instruction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    _add_model_arg(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser(
        "chat",
        help="interactive chat about images",
        description="Multi-turn chat; ':image PATH' attaches an image to your next message.",
        epilog="example: harmon-hf chat --model harmon-0.5b",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    _add_model_arg(p)
    p.set_defaults(func=cmd_chat)

    from .convert import add_arguments

    p = sub.add_parser(
        "convert",
        help="convert upstream checkpoints",
        description="Convert harmon_*.pth + kl16.ckpt + a Qwen2.5 folder into a harmon-hf pipeline folder.",
        epilog="example: harmon-hf convert --checkpoint harmon_1.5b.pth --vae kl16.ckpt "
        "--llm Qwen2.5-1.5B-Instruct --output harmon-1.5b --dtype bfloat16",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
