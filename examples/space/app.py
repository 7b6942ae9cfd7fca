#!/usr/bin/env python
"""Harmon demo: one model that draws images from text and answers questions about images (a Gradio app).

    python examples/space/app.py                          # the model embedded in harmon-hf (Harmon-Shapes)
    python examples/space/app.py --model harmon-1.5b      # a folder made by `harmon-hf convert`
    HARMON_MODEL=harmon-1.5b python examples/space/app.py

As a Hugging Face Space this file is the Space's `app.py` (see README.md next to it); the model comes from the
`HARMON_MODEL` variable (a local folder or a Hub repository id) or falls back to the embedded one.

`build_demo(model_dir)` returns the `gr.Blocks` app (with its queue set up) without launching it; tests and other
apps can launch or mount it themselves.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from harmon_hf import HarmonPipeline

EXAMPLE_PROMPTS = [
    "a red circle",
    "a blue square to the left of a green triangle",
    "two yellow circles",
    "a red circle above a yellow square",
    "a purple circle",
]

MAX_SEED = 2**31 - 1
MAX_NEW_TOKENS = 512
GUIDANCE_RANGE = (1.0, 20.0)
TEMPERATURE_RANGE = (0.0, 5.0)
DIFFUSION_STEPS_RANGE = (1, 1000)


def resolve_model(model: str | os.PathLike | None = None) -> str:
    """`model`, else `$HARMON_MODEL`, else the embedded default model; a local folder or a Hub repository id."""
    value = model or os.environ.get("HARMON_MODEL")
    if value:
        return str(value)
    from harmon_hf.default_model import default_model_path

    return str(default_model_path())


def load_pipeline(model: str, device: str | None = None, dtype: str = "float32") -> HarmonPipeline:
    """Load the pipeline once; its `model` and `processor` also serve the Understand tab."""
    path = Path(model)
    if not path.is_dir() and (path.is_absolute() or model.startswith(".") or model.count("/") != 1):
        raise FileNotFoundError(f"model folder not found: {model} (give a local folder or a Hub repository id)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = HarmonPipeline.from_pretrained(model, dtype=getattr(torch, dtype))
    pipe.to(device)
    pipe.model.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# validation: every value is checked on the server too (API clients are not bound by the sliders)
# ---------------------------------------------------------------------------------------------------------------
def _number(name: str, value: Any, low: float, high: float, integer: bool = False) -> float | int:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise gr.Error(f"{name} must be a number, got {value!r}.")
    if value != value or not low <= value <= high:  # NaN or out of range
        raise gr.Error(f"{name} must be between {low:g} and {high:g}, got {value:g}.")
    if integer:
        if int(value) != value:
            raise gr.Error(f"{name} must be a whole number, got {value:g}.")
        return int(value)
    return float(value)


@dataclass
class DemoLimits:
    """The ranges the app accepts (derived from the model)."""

    default_size: int
    min_size: int
    max_size: int
    stride: int
    max_rounds: int
    max_images: int


@dataclass
class Conversation:
    """One chat (per browser session): the model's messages, their images and the chat shown on screen."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    shown: list[dict[str, str]] = field(default_factory=list)
    last_image: str | None = None


def _image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def build_demo(
    model_dir: str | os.PathLike | None = None,
    *,
    pipe: HarmonPipeline | None = None,
    device: str | None = None,
    dtype: str = "float32",
    concurrency_limit: int = 1,
    max_queue_size: int = 32,
    max_images: int = 4,
    default_rounds: int | None = None,
    default_diffusion_steps: int | None = None,
    default_max_new_tokens: int = 128,
) -> gr.Blocks:
    """The Harmon demo as a `gr.Blocks` app (not launched).

    Args:
        model_dir: a model folder (`harmon-hf convert` output or a training output folder) or a Hub repository id;
            `None` uses `$HARMON_MODEL`, else the model embedded in harmon-hf.
        pipe: an already loaded `HarmonPipeline` (then `model_dir`, `device` and `dtype` are ignored).
        device, dtype: where and how to load the model (default: cuda if available, float32).
        concurrency_limit: requests run at the same time (both tabs share the model and this limit); more wait in
            the queue, which holds at most `max_queue_size`.
        max_images: the most images per prompt a request may ask for.
        default_rounds, default_diffusion_steps: initial MAR rounds (default: the pipeline folder's, see
            `HarmonPipeline.sampling_defaults`) and diffusion-head steps per round (default: the scheduler's) shown in
            the Generate tab; guidance and temperature start at the folder's defaults too.
        default_max_new_tokens: initial answer length limit of the Understand tab.
    """
    name = str(model_dir) if pipe is not None and model_dir else resolve_model(model_dir)
    if pipe is None:
        pipe = load_pipeline(name, device=device, dtype=dtype)
    model, processor = pipe.model, pipe.processor
    stride = model.config.image_stride
    default_size = pipe.default_sample_size
    limits = DemoLimits(
        default_size=default_size,
        min_size=min(default_size, max(2 * stride, default_size // 4)),
        max_size=max(default_size, min(1024, 2 * default_size)),
        stride=stride,
        max_rounds=max(1, (max(default_size, min(1024, 2 * default_size)) // stride) ** 2),
        max_images=max_images,
    )
    scheduler_steps = int(getattr(pipe.scheduler.config, "num_inference_steps", 100) or 100)
    diffusion_default = default_diffusion_steps or scheduler_steps
    sampling = pipe.sampling_defaults
    rounds_default = default_rounds or sampling["num_inference_steps"]
    lock_id = "harmon-model"

    # -----------------------------------------------------------------------------------------------------------
    # Generate
    # -----------------------------------------------------------------------------------------------------------
    def generate(
        prompt: str,
        guidance: float,
        rounds: int,
        temperature: float,
        width: int,
        height: int,
        seed: int,
        randomize_seed: bool,
        num_images: int,
        diffusion_steps: int,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio's progress-injection idiom
    ) -> tuple[list[tuple[Image.Image, str]], int]:
        """Draw `num_images` pictures for `prompt`; returns the gallery and the seed used."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise gr.Error("Enter a prompt first.")
        guidance = _number("Guidance", guidance, *GUIDANCE_RANGE)
        rounds = _number("MAR rounds", rounds, 1, limits.max_rounds, integer=True)
        temperature = _number("Temperature", temperature, *TEMPERATURE_RANGE)
        width = _number("Width", width, limits.min_size, limits.max_size, integer=True)
        height = _number("Height", height, limits.min_size, limits.max_size, integer=True)
        for label, value in (("Width", width), ("Height", height)):
            if value % stride:
                raise gr.Error(f"{label} must be a multiple of {stride}, got {value}.")
        num_images = _number("Images per prompt", num_images, 1, max_images, integer=True)
        diffusion_steps = _number("Diffusion steps", diffusion_steps, *DIFFUSION_STEPS_RANGE, integer=True)
        if randomize_seed:
            seed = random.randint(0, MAX_SEED)
        seed = _number("Seed", seed, 0, MAX_SEED, integer=True)
        total = min(rounds, (width // stride) * (height // stride))
        progress(0, desc="Reading the prompt")

        def on_round(_pipe, i, _t, tensors):
            progress((i + 1) / total, desc=f"MAR round {i + 1}/{total}")
            return tensors

        try:
            images = pipe(
                prompt.strip(),
                height=height,
                width=width,
                num_inference_steps=rounds,
                num_diffusion_steps=diffusion_steps,
                guidance_scale=guidance,
                temperature=temperature,
                num_images_per_prompt=num_images,
                generator=[torch.Generator().manual_seed(seed + i) for i in range(num_images)],
                callback_on_step_end=on_round,
            ).images
        except ValueError as err:  # e.g. a prompt longer than the model's context
            raise gr.Error(str(err)) from None
        return [(image, f"seed {seed + i}") for i, image in enumerate(images)], seed

    # -----------------------------------------------------------------------------------------------------------
    # Understand
    # -----------------------------------------------------------------------------------------------------------
    def respond(
        image: Image.Image | None, question: str, conversation: Conversation | None, max_new_tokens: int
    ) -> Iterator[tuple[list[dict[str, str]], Conversation, str]]:
        """Answer `question` about the image (streamed); earlier turns of the session are kept."""
        conversation = conversation or Conversation()
        if not isinstance(question, str) or not question.strip():
            raise gr.Error("Type a question first.")
        max_new_tokens = _number("Max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True)
        content: list[dict[str, str]] = []
        new_image, key = None, conversation.last_image
        if image is not None:
            image = image.convert("RGB")
            if _image_key(image) != conversation.last_image:  # a new (or first) image joins this turn
                new_image, key = image, _image_key(image)
                content.append({"type": "image"})
        if not conversation.images and new_image is None:
            raise gr.Error("Upload an image first.")
        question = question.strip()
        content.append({"type": "text", "text": question})
        messages = conversation.messages + [{"role": "user", "content": content}]
        images = conversation.images + ([new_image] if new_image is not None else [])
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=images, return_tensors="pt").to(model.device)

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
            except BaseException as err:  # reported to the user below; the stream must end either way
                failure.append(err)
                streamer.on_finalized_text("", stream_end=True)

        shown = conversation.shown + [{"role": "user", "content": question}]
        if new_image is not None and len(images) > 1:
            shown[-1]["content"] = f"(new image) {question}"
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield shown + [{"role": "assistant", "content": answer}], conversation, ""
        thread.join()
        if failure:
            raise gr.Error(f"Generation failed: {failure[0]}")
        answer = answer.strip()
        conversation.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        conversation.images = images
        conversation.last_image = key
        conversation.shown = shown + [{"role": "assistant", "content": answer}]
        yield conversation.shown, conversation, ""

    def reset() -> tuple[list, Conversation, None]:
        return [], Conversation(), None

    # -----------------------------------------------------------------------------------------------------------
    # layout
    # -----------------------------------------------------------------------------------------------------------
    title = Path(name).name or name
    with gr.Blocks(title=f"Harmon: {title}") as demo:
        gr.Markdown(
            f"# Harmon\nOne model that **draws** images from text and **reads** them (model: `{title}`). "
            "[Paper](https://arxiv.org/abs/2503.21979) · "
            "[Upstream code](https://github.com/wusize/Harmon)"
        )
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", placeholder="a red circle", lines=2, elem_id="prompt")
                    run_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    with gr.Accordion("Settings", open=True):
                        guidance = gr.Slider(
                            *GUIDANCE_RANGE, value=sampling["guidance_scale"], step=0.1, label="Guidance scale"
                        )
                        rounds = gr.Slider(
                            1, limits.max_rounds, value=min(rounds_default, limits.max_rounds), step=1,
                            label="MAR rounds (clamped to the number of image tokens)",
                        )  # fmt: skip
                        temperature = gr.Slider(
                            *TEMPERATURE_RANGE, value=sampling["temperature"], step=0.05, label="Temperature"
                        )
                        with gr.Row():
                            width = gr.Slider(
                                limits.min_size, limits.max_size, value=default_size, step=stride, label="Width"
                            )
                            height = gr.Slider(
                                limits.min_size, limits.max_size, value=default_size, step=stride, label="Height"
                            )
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                            randomize = gr.Checkbox(value=False, label="Random seed")
                        num_images = gr.Slider(1, max_images, value=1, step=1, label="Images per prompt")
                        diffusion_steps = gr.Slider(
                            1, 250, value=diffusion_default, step=1, label="Diffusion-head steps per round"
                        )
                with gr.Column(scale=1):
                    gallery = gr.Gallery(label="Images", columns=2, height="auto", elem_id="gallery")
            gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts")
            inputs = [prompt, guidance, rounds, temperature, width, height, seed, randomize, num_images]
            inputs.append(diffusion_steps)
            for trigger, api_name in ((run_button.click, "generate"), (prompt.submit, False)):
                trigger(
                    generate,
                    inputs=inputs,
                    outputs=[gallery, seed],
                    api_name=api_name,
                    concurrency_limit=concurrency_limit,
                    concurrency_id=lock_id,
                )

        with gr.Tab("Understand", id="understand"):
            conversation = gr.State(Conversation())
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="pil", label="Image", elem_id="image")
                    max_new_tokens = gr.Slider(
                        1, MAX_NEW_TOKENS, value=default_max_new_tokens, step=1, label="Max new tokens"
                    )
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=360)
                    question = gr.Textbox(
                        label="Question", placeholder="Describe the image.", elem_id="question", lines=1
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send-button")
                        clear = gr.Button("New conversation")
            gr.Examples(
                examples=[["Describe the image."], ["What colour is the shape?"], ["How many shapes are there?"]],
                inputs=[question],
                label="Example questions",
            )
            for trigger, api_name in ((send.click, "chat"), (question.submit, False)):
                trigger(
                    respond,
                    inputs=[image, question, conversation, max_new_tokens],
                    outputs=[chatbot, conversation, question],
                    api_name=api_name,
                    concurrency_limit=concurrency_limit,
                    concurrency_id=lock_id,
                )
            clear.click(reset, outputs=[chatbot, conversation, image], api_name="reset")

    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    return demo


def main(argv: list[str] | None = None) -> None:
    """Command line: load the model, build the app and serve it."""
    parser = argparse.ArgumentParser(description="Harmon Gradio demo (Generate + Understand tabs).")
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: $HARMON_MODEL or embedded)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--host", default=None, help="address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests running at the same time (default 1)")
    parser.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    args = parser.parse_args(argv)
    try:
        demo = build_demo(args.model, device=args.device, dtype=args.dtype, concurrency_limit=args.concurrency)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {' '.join(str(err).split())}\n")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
