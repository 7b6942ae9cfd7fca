"""`HarmonPipeline`: text-to-image with Harmon as a diffusers pipeline.

Components: `model` (`HarmonForConditionalGeneration`, the VAE inside), `scheduler` (the diffusion head's sampler,
`HarmonDDPMScheduler` by default) and `processor` (`HarmonProcessor`, which builds the prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring

from .modeling_harmon import HarmonForConditionalGeneration
from .processing_harmon import HarmonProcessor

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from harmon_hf import HarmonPipeline
        >>> pipe = HarmonPipeline.from_pretrained("path/to/harmon-folder")
        >>> image = pipe("a red cube on a blue table", generator=torch.Generator().manual_seed(0)).images[0]
        ```
"""


class HarmonPipeline(DiffusionPipeline):
    r"""Text-to-image generation with Harmon (masked autoregressive rounds + a per-token diffusion head).

    Args:
        model: `HarmonForConditionalGeneration` (LLM, MAR, diffusion head, VAE).
        scheduler: the diffusion head's sampler. `HarmonDDPMScheduler` reproduces upstream; a `DDIMScheduler` or
            `DPMSolverMultistepScheduler` with the same betas samples with fewer steps.
        processor: `HarmonProcessor`, used to build the chat-template prompts.
        default_image_size: default height/width in pixels (512 for the released models, as upstream samples).
        default_num_inference_steps, default_guidance_scale, default_temperature: the folder's sampling defaults,
            used where a call does not pass the argument (None = upstream's: 64 MAR rounds, guidance 3.0,
            temperature 1.0; see `UPSTREAM_SAMPLING`). Saved in `model_index.json`, so a model ships the settings
            it was tuned for (Harmon-Shapes: one round, guidance 2.0, temperature 0.4).
    """

    model_cpu_offload_seq = "model"
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["tokens", "mask"]

    def __init__(
        self,
        model: HarmonForConditionalGeneration,
        scheduler,
        processor: HarmonProcessor,
        default_image_size: int | None = None,
        default_num_inference_steps: int | None = None,
        default_guidance_scale: float | None = None,
        default_temperature: float | None = None,
    ):
        super().__init__()
        check_sampling_defaults(default_num_inference_steps, default_guidance_scale, default_temperature)
        self.register_modules(model=model, scheduler=scheduler, processor=processor)
        self.register_to_config(
            default_image_size=default_image_size,
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            default_temperature=default_temperature,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=16, do_normalize=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a pipeline folder (`model_index.json` + `model/`, `scheduler/`, `processor/`), as diffusers does.

        A flat transformers folder (a Harmon `config.json` + weights + processor files, e.g. what `examples/train.py`
        or `Trainer.save_model` writes) also loads: the model and processor come from it and the scheduler is the
        default `HarmonDDPMScheduler` (or `scheduler=`). `dtype`/`device_map` are passed to the model.
        """
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir() and not (folder / "model_index.json").is_file() and (folder / "config.json").is_file():
            from .scheduling_harmon import HarmonDDPMScheduler

            model_kwargs = {k: kwargs.pop(k) for k in ("dtype", "device_map", "attn_implementation") if k in kwargs}
            model = kwargs.pop("model", None) or HarmonForConditionalGeneration.from_pretrained(folder, **model_kwargs)
            processor = kwargs.pop("processor", None) or HarmonProcessor.from_pretrained(folder)
            scheduler = kwargs.pop("scheduler", None) or HarmonDDPMScheduler()
            if kwargs:
                raise ValueError(f"unsupported arguments for a flat model folder {folder}: {sorted(kwargs)}")
            return cls(model=model, scheduler=scheduler, processor=processor)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def vae(self):
        """The VAE inside the model (read-only; it is saved with the model)."""
        return self.model.model.vae

    @property
    def default_sample_size(self) -> int:
        return self.config.default_image_size or self.model.config.image_size

    @property
    def sampling_defaults(self) -> dict[str, int | float]:
        """What a call uses when it does not pass them: `num_inference_steps`, `guidance_scale`, `temperature` (the
        folder's `default_*` settings, else `UPSTREAM_SAMPLING`)."""
        config = self.config
        return {
            name: value if (value := getattr(config, f"default_{name}", None)) is not None else upstream
            for name, upstream in UPSTREAM_SAMPLING.items()
        }

    def resolve_sampling(
        self,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
    ) -> tuple[int, float, float]:
        """`(num_inference_steps, guidance_scale, temperature)` with each None replaced by `sampling_defaults`."""
        defaults = self.sampling_defaults
        return (
            defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
            defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
            defaults["temperature"] if temperature is None else temperature,
        )

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_schedule: str,
        temperature: float,
        num_images_per_prompt: int,
        generator,
        output_type: str,
        callback_on_step_end_tensor_inputs,
    ) -> list[str]:
        """Validate every argument before heavy work; returns the prompts as a list."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompt is an empty list: give at least one prompt")
        if negative_prompt is not None and not isinstance(negative_prompt, str):  # one string serves every prompt
            if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
                raise ValueError(
                    f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}"
                )
            if len(negative_prompt) != len(prompts):
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        stride = self.model.config.image_stride
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < stride or value % stride:
                raise ValueError(f"{name} must be a positive multiple of {stride}, got {value}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps (MAR rounds) must be an integer >= 1, got {num_inference_steps}")
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        if guidance_schedule not in ("constant", "linear"):
            raise ValueError(f"guidance_schedule must be 'constant' or 'linear', got {guidance_schedule!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt}")
        n_images = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != n_images:
            raise ValueError(
                f"got a list of {len(generator)} generators for {n_images} images "
                f"({len(prompts)} prompts x {num_images_per_prompt}); pass one generator or one per image"
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        for name in callback_on_step_end_tensor_inputs or []:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor {name!r} is not one of {self._callback_tensor_inputs}")
        return list(prompts)

    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        num_image_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids `(R, S)` and mask: conditional rows (each prompt repeated per image), then unconditional rows."""
        batch = self.processor.build_t2i_prompts(
            prompts,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            add_unconditional=do_classifier_free_guidance,
        )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        limit = self.model.config.text_config.max_position_embeddings
        longest = int(attention_mask.sum(1).max())
        if longest + num_image_tokens > limit:
            raise ValueError(
                f"a prompt of {longest} tokens plus {num_image_tokens} image positions exceeds the model's context of "
                f"{limit} positions; shorten the prompt"
            )
        return input_ids, attention_mask

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str = "constant",
        temperature: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_diffusion_steps: int | None = None,
        orders: torch.LongTensor | None = None,
        diffusion_init_noise: Sequence[torch.Tensor] | None = None,
        diffusion_step_noise: Sequence[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_batch_size: int | None = 8,
        vae_batch_size: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: one prompt or a list.
            negative_prompt: replaces the unconditional prompt "Generate an image." of guidance (same template).
            height, width: pixels, multiples of 16 (default `default_image_size`); non-square is fine.
            num_inference_steps: MAR rounds (default: the folder's `default_num_inference_steps`, else 64 as
                upstream). At most (height/16)*(width/16); more are clamped.
            guidance_scale: classifier-free guidance on the head's eps (1 = off; default: the folder's, else 3.0).
            guidance_schedule: "constant" or "linear" (grows from 1 to `guidance_scale` with the drawn fraction).
            temperature: scales the diffusion head's sampling noise (default: the folder's, else 1.0).
            num_images_per_prompt: images per prompt.
            generator: a `torch.Generator`, or one per image: image i then takes its generation order and all its
                noise from `generator[i]`, so a batch reproduces the same prompts run one by one.
            num_diffusion_steps: diffusion-head steps per round (default: the scheduler's, 100).
            orders, diffusion_init_noise, diffusion_step_noise: injected randomness (tests, reproductions); see
                `HarmonForConditionalGeneration.generate_image_tokens`.
            output_type: "pil", "np" (float in [0, 1], NHWC), "pt" (float in [0, 1], NCHW) or "latent" (the token
                latents `(N, m, n, C)`).
            callback_on_step_end: `fn(pipe, round, round, {"tokens": ..., "mask": ...})` called after each round
                (`tokens` `(N, L, C)` of the N images, `mask` `(N, L)`, 1 = not drawn yet); it may return a dict
                whose `"tokens"` replace the current ones (e.g. `return callback_kwargs` after editing them).
                With several chunks (`max_batch_size`) it runs per chunk, N = the chunk's images.
            max_batch_size: at most this many images per model call (throughput mode: the images of one call share
                every diffusion-head step, and the head's cost per step barely grows with its rows, so one call of 8
                costs far less than 8 calls of 1); more images are generated chunk after chunk, so memory stays
                bounded. `None` = all images in one call. With one generator per image the chunks give the same
                images as one call (each image draws only from its own generator); one shared generator is consumed
                chunk after chunk. Injected `diffusion_init_noise` / `diffusion_step_noise` need a single call.
            vae_batch_size: images per VAE decode call. Default on a CPU: as many as make 256 x 256 pixels (one
                picture of 256 px or more, 16 of 64 px; `CPU_VAE_PIXELS_PER_CALL`), the whole chunk elsewhere.

        Examples:

        Returns:
            `ImagePipelineOutput` with `images`, or a tuple `(images,)` if `return_dict=False`.
        """
        # (`is None`, not `or`: height=0 must be reported, not replaced by the default)
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        num_inference_steps, guidance_scale, temperature = self.resolve_sampling(
            num_inference_steps, guidance_scale, temperature
        )
        prompts = self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            guidance_schedule,
            temperature,
            num_images_per_prompt,
            generator,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        stride = self.model.config.image_stride
        size = (height // stride, width // stride)
        do_cfg = guidance_scale != 1.0
        n_tokens = size[0] * size[1] + self.model.config.buffer_size
        input_ids, attention_mask = self.encode_prompt(
            prompts, negative_prompt, num_images_per_prompt, do_cfg, n_tokens
        )
        device = self._execution_device
        num_iter = min(num_inference_steps, size[0] * size[1])
        if num_iter < num_inference_steps:
            logger.warning(
                f"num_inference_steps={num_inference_steps} exceeds the {num_iter} image tokens of a {height}x{width} "
                f"image; using {num_iter} MAR rounds (one token per round)."
            )
        self._num_timesteps = num_iter
        n_images = len(prompts) * num_images_per_prompt
        chunks = image_chunks(n_images, max_batch_size)
        if vae_batch_size is not None and (
            isinstance(vae_batch_size, bool) or not isinstance(vae_batch_size, int) or vae_batch_size < 1
        ):
            raise ValueError(f"vae_batch_size must be a positive integer or None, got {vae_batch_size!r}")
        if len(chunks) > 1 and (diffusion_init_noise is not None or diffusion_step_noise is not None):
            raise ValueError(
                f"injected diffusion noise covers all {n_images} images at once: pass max_batch_size=None "
                f"(or >= {n_images}) with diffusion_init_noise / diffusion_step_noise"
            )

        outputs = []
        with self.progress_bar(total=num_iter * len(chunks)) as progress:

            def on_round(i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
                out = None
                if callback_on_step_end is not None:
                    wanted = {k: tensors[k] for k in callback_on_step_end_tensor_inputs or ["tokens"]}
                    out = callback_on_step_end(self, i, i, wanted)
                progress.update()
                return out

            for start, stop in chunks:
                ids, mask = chunk_prompt_rows(input_ids, attention_mask, n_images, start, stop, do_cfg)
                tokens = self.model.generate_image_tokens(
                    ids.to(device),
                    mask.to(device),
                    size,
                    num_iter=num_iter,
                    guidance_scale=guidance_scale,
                    guidance_schedule=guidance_schedule,
                    temperature=temperature,
                    scheduler=self.scheduler,
                    num_diffusion_steps=num_diffusion_steps,
                    generator=generator[start:stop] if isinstance(generator, list) else generator,
                    orders=None if orders is None else orders[start:stop],
                    init_noise=diffusion_init_noise,
                    step_noise=diffusion_step_noise,
                    callback=on_round,
                )
                if output_type == "latent":
                    outputs.append(tokens)
                else:
                    # decoded chunk by chunk too: the VAE's activations are the largest tensors of a call
                    outputs.append(decode_in_slices(self.model, tokens, vae_batch_size).float())

        images = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if output_type != "latent":
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ----- LoRA adapters: thin wrappers over PEFT (docs/lora.md) ------------------------------------------------
    # diffusers' LoRA mixins are keyed by diffusers-model components and do not fit a transformers model, so these
    # go through peft directly. `PeftModel` injects the LoRA layers into `self.model` in place: the pipeline keeps
    # calling the Harmon model itself, and the `PeftModel` is only kept to manage the adapters.
    @property
    def peft_model(self):
        """The `peft.PeftModel` that manages the loaded adapters of `self.model` (`None` when none is loaded)."""
        return self.__dict__.get("_peft_model")

    def load_lora_weights(
        self, pretrained_model_name_or_path: str | Path, adapter_name: str = "default", **kwargs
    ) -> None:
        """Load a LoRA adapter (a folder or Hub repo with `adapter_config.json` + `adapter_model.safetensors`, as
        written by `PeftModel.save_pretrained` or `examples/train.py --lora`) onto `self.model` and activate it.

        `kwargs` go to `PeftModel.from_pretrained` / `load_adapter` (`subfolder`, `revision`, ...). Loading a second
        adapter (another `adapter_name`) makes it the active one; `set_adapters` combines several.
        """
        from peft import PeftModel

        peft_model = self.peft_model
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(self.model, pretrained_model_name_or_path, adapter_name, **kwargs)
            self._peft_model = peft_model
        else:
            if adapter_name in peft_model.peft_config:
                raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name")
            peft_model.load_adapter(pretrained_model_name_or_path, adapter_name, **kwargs)
            peft_model.set_adapter(adapter_name)
        self.model.eval()

    def set_adapters(self, adapter_names: str | list[str]) -> None:
        """Activate the named loaded adapter(s); several active adapters add their updates."""
        self._require_peft_model().base_model.set_adapter(adapter_names)

    def fuse_lora(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active (or the named) adapters into the base weights (faster sampling); `unfuse_lora` undoes
        it. `fuse_lora()` then `unload_lora_weights()` leaves a plain model with the adapters baked in."""
        self._require_peft_model().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unfuse_lora(self) -> None:
        """Subtract fused adapters from the base weights again."""
        self._require_peft_model().unmerge_adapter()

    def unload_lora_weights(self) -> None:
        """Remove every LoRA layer from `self.model`. Unfused adapters are dropped (the base model comes back);
        fused ones stay in the weights, as in diffusers, so the pipeline can then be saved as a merged model."""
        peft_model = self.peft_model
        if peft_model is None:
            return
        base = peft_model.unload()  # replaces the LoRA layers by their base layers inside self.model
        if base is not self.model:  # unload() works in place; anything else would leave the pipeline stale
            self.register_modules(model=base)
        self._peft_model = None

    def _require_peft_model(self):
        if self.peft_model is None:
            raise ValueError("no LoRA adapter is loaded; call load_lora_weights(path) first")
        return self.peft_model


UPSTREAM_SAMPLING: dict[str, int | float] = {"num_inference_steps": 64, "guidance_scale": 3.0, "temperature": 1.0}


def check_sampling_defaults(
    num_inference_steps: int | None, guidance_scale: float | None, temperature: float | None
) -> None:
    """Raise ValueError naming a bad `HarmonPipeline` sampling default (None = upstream's, always fine)."""
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise ValueError(f"default_num_inference_steps must be a positive integer or None, got {num_inference_steps!r}")
    for name, value, low in (
        ("default_guidance_scale", guidance_scale, 1.0),
        ("default_temperature", temperature, 0.0),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or value == float("inf")
        ):
            raise ValueError(f"{name} must be a number >= {low:g} or None, got {value!r}")


def set_vae_dtype(model: HarmonForConditionalGeneration, dtype: torch.dtype) -> None:
    """Cast the model's VAE to `dtype` in place (loading keeps it float32 whatever the model's dtype; a bfloat16 VAE
    decodes faster on GPUs and on CPUs with AMX, for pictures that differ from the float32 ones by rounding)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"the VAE's dtype must be a floating-point torch.dtype, got {dtype!r}")
    vae = model.model.vae
    if vae.dtype == dtype:
        return
    # diffusers' `ModelMixin.to` warns about its fp32-kept modules on every dtype cast, even when there are none
    vae_logger = logging.get_logger("diffusers.models.modeling_utils")
    level = vae_logger.level
    vae_logger.setLevel(logging.ERROR)
    try:
        vae.to(dtype)
    finally:
        vae_logger.setLevel(level)


# Pixels decoded per VAE call on a CPU by default (`decode_in_slices`). Larger calls are slower per picture once the
# decoder's activations fall out of the caches: kl16 widths at 256 px on 2 cores with AMX (2026-12-05), per picture,
# one by one against 8 in one call: float32 1.05 s against 1.43 s, bfloat16 0.23 s against 0.36 s. Small pictures
# gain from batching: Harmon-Shapes' 64 px, 8 in one call against one by one, float32 5.0 ms against 8.4 ms.
CPU_VAE_PIXELS_PER_CALL = 256 * 256


def decode_in_slices(
    model: HarmonForConditionalGeneration, tokens: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """`model.decode_image_tokens` on slices of at most `batch_size` images of `tokens` `(B, m, n, C)` (default: on a
    CPU as many as make `CPU_VAE_PIXELS_PER_CALL` pixels, at least one; all otherwise). Each image is decoded on its
    own either way (no cross-image op)."""
    if batch_size is None:
        if tokens.device.type == "cpu":
            pixels = tokens.shape[1] * tokens.shape[2] * model.config.image_stride**2
            batch_size = max(1, CPU_VAE_PIXELS_PER_CALL // pixels)
        else:
            batch_size = tokens.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"vae_batch_size must be a positive integer or None, got {batch_size!r}")
    if batch_size >= tokens.shape[0]:
        return model.decode_image_tokens(tokens)
    return torch.cat([model.decode_image_tokens(part) for part in tokens.split(batch_size)])


def image_chunks(n_images: int, max_batch_size: int | None) -> list[tuple[int, int]]:
    """`[start, stop)` ranges of at most `max_batch_size` images covering `n_images` (one range for `None`)."""
    if max_batch_size is None:
        return [(0, n_images)]
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer or None, got {max_batch_size!r}")
    return [(a, min(a + max_batch_size, n_images)) for a in range(0, n_images, max_batch_size)]


def chunk_prompt_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, n_images: int, start: int, stop: int, cfg: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt rows of images `[start, stop)`: their conditional rows (and, with guidance, their unconditional
    rows, which follow all `n_images` conditional ones), without the padding columns no row of the chunk needs."""
    rows = list(range(start, stop))
    if cfg:
        rows += [n_images + i for i in rows]
    ids, mask = input_ids[rows], attention_mask[rows]
    width = int(mask.sum(1).max())  # right padding: columns past the chunk's longest prompt are pure padding
    return ids[:, :width], mask[:, :width]


__all__ = ["HarmonPipeline"]
