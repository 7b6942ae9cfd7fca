"""`HarmonPipeline` behaviour on the converted tiny fixture model (the fixture parity of its sampling runs is in
test_modeling.py): output types, batching and generators, sizes, guidance schedules, callbacks, negative prompts,
swapped schedulers, save/load, input validation, CPU offload."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from fixture_utils import FIXTURE_DIR, requires_fixture

from harmon_hf import HarmonPipeline
from harmon_hf.convert import convert
from harmon_hf.scheduling_harmon import HarmonDDPMScheduler

pytestmark = requires_fixture

# Few MAR rounds and diffusion steps: these tests check behaviour, not the upstream numbers.
FAST = dict(height=64, width=64, num_inference_steps=3, num_diffusion_steps=4)
PROMPTS = ["a red cube on a blue table.", "a small green cat in a field"]


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "harmon-tiny"
    return convert(FIXTURE_DIR / "harmon.pth", FIXTURE_DIR / "kl16.ckpt", FIXTURE_DIR / "llm", out, verbose=False)


@pytest.fixture(scope="module")
def pipe(converted_dir: Path) -> HarmonPipeline:
    pipeline = HarmonPipeline.from_pretrained(converted_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def close_relative(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    """Token latents of the random-weight model reach ~1e5 (fixture README); compare relative to their scale."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    torch.testing.assert_close(a, b, atol=rtol * scale, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def test_output_types(pipe: HarmonPipeline) -> None:
    def call(output_type: str, **kwargs):
        return pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type=output_type, **FAST, **kwargs)

    pil = call("pil")
    assert isinstance(pil, ImagePipelineOutput)
    assert len(pil.images) == 1 and isinstance(pil.images[0], PIL.Image.Image)
    assert pil.images[0].size == (64, 64) and pil.images[0].mode == "RGB"
    np_images = call("np").images
    assert isinstance(np_images, np.ndarray) and np_images.shape == (1, 64, 64, 3) and np_images.dtype == np.float32
    assert 0 <= np_images.min() and np_images.max() <= 1
    pt = call("pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil.images[0]), (np_images[0] * 255).round().astype(np.uint8))
    latent = call("latent").images
    assert latent.shape == (1, 4, 4, 16)
    decoded = pipe.model.decode_image_tokens(latent)
    torch.testing.assert_close(pt, ((decoded + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)
    as_tuple = call("pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], pt, atol=0, rtol=0)


def test_reproducible_with_a_generator(pipe: HarmonPipeline) -> None:
    a = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(3), output_type="latent", **FAST).images
    b = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(3), output_type="latent", **FAST).images
    c = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(4), output_type="latent", **FAST).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_with_generators_equals_each_prompt_alone(pipe: HarmonPipeline) -> None:
    batch = pipe(PROMPTS, generator=seeded(1, 2), output_type="latent", **FAST).images
    alone = [pipe(p, generator=seeded(s), output_type="latent", **FAST).images for p, s in zip(PROMPTS, (1, 2))]
    assert batch.shape == (2, 4, 4, 16)
    close_relative(batch, torch.cat(alone))
    # the images too (decoded from those tokens)
    images = pipe(PROMPTS, generator=seeded(1, 2), output_type="pt", **FAST).images
    single = pipe(PROMPTS[1], generator=seeded(2), output_type="pt", **FAST).images
    torch.testing.assert_close(images[1:], single, atol=1e-4, rtol=0)


def test_num_images_per_prompt(pipe: HarmonPipeline) -> None:
    out = pipe(PROMPTS, num_images_per_prompt=2, generator=seeded(1, 2, 3, 4), output_type="latent", **FAST).images
    assert out.shape == (4, 4, 4, 16)
    # image k of prompt p is row 2p + k and depends only on its own generator
    alone = pipe(PROMPTS[1], generator=seeded(3), output_type="latent", **FAST).images
    close_relative(out[2:3], alone)
    assert not torch.allclose(out[2], out[3])  # different seeds, different images of one prompt
    # one generator for all: images differ from each other, and the call is reproducible
    one = pipe(
        PROMPTS[0], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0), output_type="latent", **FAST
    )
    again = pipe(
        PROMPTS[0], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0), output_type="latent", **FAST
    )
    assert one.images.shape == (3, 4, 4, 16) and torch.equal(one.images, again.images)
    assert not torch.allclose(one.images[0], one.images[1])


@pytest.mark.parametrize(("height", "width"), [(64, 32), (32, 96), (128, 128)])
def test_other_sizes(pipe: HarmonPipeline, height: int, width: int) -> None:
    """Grids other than the trained 4x4 (non-square, larger) go through the position-table resizing."""
    kwargs = dict(FAST, height=height, width=width)
    out = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    assert out.shape == (1, height, width, 3) and np.isfinite(out).all()
    latent = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    assert latent.shape == (1, height // 16, width // 16, 16)
    pil = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert pil.size == (width, height)


def test_bfloat16_pipeline(converted_dir: Path) -> None:
    pipeline = HarmonPipeline.from_pretrained(converted_dir, dtype=torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.model.dtype == torch.bfloat16 and pipeline.vae.dtype == torch.float32
    images = pipeline(PROMPTS[0], generator=seeded(0), output_type="np", **FAST).images
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.float32 and np.isfinite(images).all()


def test_sampling_defaults_are_saved_and_used(pipe: HarmonPipeline, tmp_path: Path) -> None:
    """A folder's `default_num_inference_steps` / `default_guidance_scale` / `default_temperature` round-trip through
    `model_index.json` and stand in for the arguments a call leaves out; explicit arguments still win; bad values
    are refused when the pipeline is built."""
    assert pipe.sampling_defaults == {"num_inference_steps": 64, "guidance_scale": 3.0, "temperature": 1.0}
    tuned = HarmonPipeline(
        model=pipe.model,
        scheduler=pipe.scheduler,
        processor=pipe.processor,
        default_num_inference_steps=2,
        default_guidance_scale=1.5,
        default_temperature=0.5,
    )
    tuned.save_pretrained(tmp_path / "tuned")
    index = json.loads((tmp_path / "tuned" / "model_index.json").read_text())
    assert (index["default_num_inference_steps"], index["default_guidance_scale"], index["default_temperature"]) == (
        2,
        1.5,
        0.5,
    )
    loaded = HarmonPipeline.from_pretrained(tmp_path / "tuned")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampling_defaults == {"num_inference_steps": 2, "guidance_scale": 1.5, "temperature": 0.5}
    assert loaded.resolve_sampling(None, 3.0, None) == (2, 3.0, 0.5)

    def latent(p: HarmonPipeline, **kwargs) -> torch.Tensor:
        kwargs = dict(height=64, width=64, num_diffusion_steps=4, **kwargs)
        return p(PROMPTS[0], generator=seeded(0), output_type="latent", **kwargs).images

    rounds = []
    loaded(PROMPTS[0], height=64, width=64, num_diffusion_steps=2, callback_on_step_end=lambda *a: rounds.append(1))
    assert len(rounds) == 2  # the folder's two MAR rounds
    explicit = dict(num_inference_steps=2, guidance_scale=1.5, temperature=0.5)
    assert torch.equal(latent(loaded), latent(pipe, **explicit))
    assert not torch.equal(latent(loaded), latent(loaded, temperature=1.0))
    for bad, message in (
        (dict(default_num_inference_steps=0), "default_num_inference_steps must be a positive integer"),
        (dict(default_num_inference_steps=2.5), "default_num_inference_steps must be a positive integer"),
        (dict(default_guidance_scale=0.5), "default_guidance_scale must be a number >= 1"),
        (dict(default_temperature=-1.0), "default_temperature must be a number >= 0"),
        (dict(default_temperature=float("nan")), "default_temperature must be a number >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            HarmonPipeline(model=pipe.model, scheduler=pipe.scheduler, processor=pipe.processor, **bad)


def test_default_size_is_the_model_resolution(pipe: HarmonPipeline) -> None:
    out = pipe(PROMPTS[0], num_inference_steps=2, num_diffusion_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (pipe.model.config.image_size,) * 2 == (64, 64)


def test_guidance_schedules(pipe: HarmonPipeline) -> None:
    def latent(**kwargs) -> torch.Tensor:
        return pipe(
            PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="latent", **FAST, **kwargs
        ).images

    constant, linear = latent(guidance_scale=3.0), latent(guidance_scale=3.0, guidance_schedule="linear")
    assert torch.isfinite(linear).all() and not torch.allclose(constant, linear)
    # guidance 1 is no guidance, whatever the schedule
    assert torch.equal(latent(guidance_scale=1.0), latent(guidance_scale=1.0, guidance_schedule="linear"))


def test_callback_on_step_end(pipe: HarmonPipeline) -> None:
    seen = []

    def callback(pipeline, i, t, tensors):
        assert pipeline is pipe and i == t
        seen.append((i, tensors["tokens"].clone(), tensors["mask"].clone()))
        return tensors

    out = pipe(
        PROMPTS,
        generator=seeded(0, 1),
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["tokens", "mask"],
        **FAST,
    ).images
    assert [i for i, _, _ in seen] == [0, 1, 2] and pipe.num_timesteps == 3
    schedule = pipe.model.mask_schedule(16, 3)
    for (_, tokens, mask), masked in zip(seen, schedule):
        assert tokens.shape == (2, 16, 16) and mask.shape == (2, 16)
        assert (mask.sum(1) == masked).all()
        assert (tokens[mask.bool()] == 0).all()  # tokens not drawn yet are still empty
    torch.testing.assert_close(out.reshape(2, 16, 16), seen[-1][1], atol=0, rtol=0)

    # the callback may replace the tokens (the default tensor input is "tokens")
    def zero_last(pipeline, i, t, tensors):
        return {"tokens": torch.zeros_like(tensors["tokens"])} if i == 2 else None

    zeroed = pipe(PROMPTS[0], generator=seeded(0), output_type="latent", callback_on_step_end=zero_last, **FAST)
    assert (zeroed.images == 0).all()

    def change_mask(pipeline, i, t, tensors):
        return {"mask": torch.zeros_like(tensors["mask"])}

    with pytest.raises(ValueError, match="cannot change the mask"):
        pipe(PROMPTS[0], callback_on_step_end=change_mask, callback_on_step_end_tensor_inputs=["mask"], **FAST)


class PromptSpy:
    """Wraps `model.generate_image_tokens` to record the prompt batch it receives."""

    def __init__(self, pipe: HarmonPipeline):
        self.pipe, self.calls = pipe, []
        self.original = pipe.model.generate_image_tokens

    def __enter__(self) -> PromptSpy:
        def spy(input_ids, attention_mask, *args, **kwargs):
            self.calls.append((input_ids.clone(), attention_mask.clone(), kwargs))
            return self.original(input_ids, attention_mask, *args, **kwargs)

        self.pipe.model.generate_image_tokens = spy
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.model.generate_image_tokens


def test_negative_prompt(pipe: HarmonPipeline) -> None:
    negative = "a blurry photo"
    with PromptSpy(pipe) as spy:
        with_negative = pipe(PROMPTS, negative_prompt=negative, generator=seeded(0, 1), output_type="latent", **FAST)
        plain = pipe(PROMPTS, generator=seeded(0, 1), output_type="latent", **FAST)
    (ids_neg, _, _), (ids_plain, _, _) = spy.calls
    expected_neg = pipe.processor.build_t2i_prompts(PROMPTS, negative_prompt=negative)["input_ids"]
    expected_plain = pipe.processor.build_t2i_prompts(PROMPTS)["input_ids"]
    assert torch.equal(ids_neg, expected_neg) and torch.equal(ids_plain, expected_plain)
    rows = len(PROMPTS)
    negative_row = pipe.processor.build_t2i_prompts([negative], add_unconditional=False)["input_ids"][0]
    assert torch.equal(ids_neg[rows:, : negative_row.shape[0]], negative_row.expand(rows, -1))
    assert not torch.allclose(with_negative.images, plain.images)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        pipe(PROMPTS[0], negative_prompt=["x", "y"], **FAST)


# ---------------------------------------------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------------------------------------------
def faster_schedulers(pipe: HarmonPipeline) -> dict[str, object]:
    config = pipe.scheduler.config
    return {
        "DDIM compatible_scheduler": pipe.scheduler.compatible_scheduler("DDIMScheduler"),
        "DDIM from_config": DDIMScheduler.from_config(config),
        "DPM-Solver compatible_scheduler": pipe.scheduler.compatible_scheduler(DPMSolverMultistepScheduler),
        "DPM-Solver from_config": DPMSolverMultistepScheduler.from_config(config, variance_type=None),
    }


def test_faster_schedulers_give_valid_images(pipe: HarmonPipeline) -> None:
    for name, scheduler in faster_schedulers(pipe).items():
        # the schedule is Harmon's, not the other class's defaults (diffusers' from_config pitfall)
        assert scheduler.config.beta_schedule == "squaredcos_cap_v2", name
        torch.testing.assert_close(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod, atol=1e-6, rtol=1e-5)
        fast = HarmonPipeline(model=pipe.model, scheduler=scheduler, processor=pipe.processor)
        fast.set_progress_bar_config(disable=True)
        images = fast(PROMPTS[0], generator=seeded(0), output_type="np", **dict(FAST, num_diffusion_steps=10)).images
        assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all(), name
        assert 0 <= images.min() and images.max() <= 1
        assert images.std() > 0, name
    # an in-memory default Harmon scheduler converts too (its defaults are Harmon's)
    assert DDIMScheduler.from_config(HarmonDDPMScheduler().config).config.beta_schedule == "squaredcos_cap_v2"
    # a DPM-Solver that keeps `learned_range` would slice 3 channels: a clear error naming the fix
    bad = HarmonPipeline(
        model=pipe.model,
        scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
        processor=pipe.processor,
    )
    bad.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="variance_type='learned_range'.*variance_type=None"):
        bad(PROMPTS[0], **FAST)


def test_scheduler_swap_by_attribute(pipe: HarmonPipeline, converted_dir: Path) -> None:
    local = HarmonPipeline.from_pretrained(converted_dir)
    local.set_progress_bar_config(disable=True)
    local.scheduler = DDIMScheduler.from_config(local.scheduler.config)
    out = local(PROMPTS[0], generator=seeded(0), output_type="np", **dict(FAST, num_diffusion_steps=8)).images
    assert np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------
def test_save_and_load_the_pipeline(pipe: HarmonPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "HarmonPipeline"
    assert index["model"] == ["harmon_hf.modeling_harmon", "HarmonForConditionalGeneration"]
    assert not (tmp_path / "saved" / "vae").exists()  # the VAE is saved once, inside the model
    loaded = HarmonPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is HarmonDDPMScheduler and loaded.vae is loaded.model.model.vae
    a = pipe(PROMPTS[0], generator=seeded(5), output_type="latent", **FAST).images
    b = loaded(PROMPTS[0], generator=seeded(5), output_type="latent", **FAST).images
    assert torch.equal(a, b)
    # a scheduler setting survives the round trip
    fast_dir = tmp_path / "fast"
    HarmonPipeline(
        model=pipe.model, scheduler=HarmonDDPMScheduler(num_inference_steps=4), processor=pipe.processor
    ).save_pretrained(fast_dir)
    assert HarmonPipeline.from_pretrained(fast_dir).scheduler.config.num_inference_steps == 4


# ---------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------
BAD_CALLS = [
    (dict(height=50), r"height must be a positive multiple of 16, got 50"),
    (dict(width=0), r"width must be a positive multiple of 16, got 0"),
    (dict(height=64.0), r"height must be a positive multiple of 16, got 64\.0"),
    (dict(num_inference_steps=0), r"num_inference_steps.*>= 1, got 0"),
    (dict(guidance_scale=0.5), r"guidance_scale must be >= 1.*got 0\.5"),
    (dict(guidance_schedule="cosine"), r"guidance_schedule must be 'constant' or 'linear', got 'cosine'"),
    (dict(temperature=-1.0), r"temperature must be >= 0, got -1\.0"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt must be an integer >= 1, got 0"),
    (dict(generator=[torch.Generator()] * 3), r"list of 3 generators for 2 images"),
    (dict(output_type="jpeg"), r"output_type must be .*got 'jpeg'"),
    (dict(callback_on_step_end_tensor_inputs=["latents"]), r"callback tensor 'latents' is not one of"),
    (dict(prompt=[]), r"prompt is an empty list"),
    (dict(prompt=["ok", 3]), r"prompt must be a string or a list of strings"),
    (
        dict(prompt="word " * 2000),
        r"a prompt of \d+ tokens plus 24 image positions exceeds the model's context of 1024",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CALLS, ids=[m.split(" ")[0] for _, m in BAD_CALLS])
def test_bad_inputs_raise_before_any_work(pipe: HarmonPipeline, kwargs: dict, message: str) -> None:
    call = dict(prompt=PROMPTS, height=64, width=64, num_inference_steps=2, num_diffusion_steps=2)
    call.update(kwargs)
    with PromptSpy(pipe) as spy, pytest.raises(ValueError, match=message):
        pipe(**call)
    assert spy.calls == []  # nothing ran


def test_more_rounds_than_tokens_are_clamped(pipe: HarmonPipeline, caplog) -> None:
    rounds = []
    with caplog.at_level(logging.WARNING):
        out = pipe(
            PROMPTS[0],
            height=32,
            width=32,
            num_inference_steps=64,
            num_diffusion_steps=2,
            generator=seeded(0),
            output_type="latent",
            callback_on_step_end=lambda p, i, t, k: rounds.append(i),
        )
    assert out.images.shape == (1, 2, 2, 16) and torch.isfinite(out.images).all()
    assert rounds == [0, 1, 2, 3] and pipe.num_timesteps == 4
    assert "num_inference_steps=64 exceeds the 4 image tokens" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# CPU offload
# ---------------------------------------------------------------------------------------------------------------
def _has_accelerator() -> bool:
    return bool(getattr(torch, "accelerator", None) and torch.accelerator.is_available())


@pytest.mark.skipif(not _has_accelerator(), reason="enable_model_cpu_offload needs an accelerator (CUDA/XPU/MPS)")
def test_enable_model_cpu_offload(converted_dir: Path) -> None:
    reference = HarmonPipeline.from_pretrained(converted_dir)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPTS[0], generator=seeded(0), output_type="np", **FAST).images
    offloaded = HarmonPipeline.from_pretrained(converted_dir)
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload()
    out = offloaded(PROMPTS[0], generator=seeded(0), output_type="np", **FAST).images
    assert out.shape == expected.shape and np.isfinite(out).all()
    assert offloaded.model.device.type == "cpu"  # moved back after the call
    assert np.abs(out - expected).mean() < 0.05  # same images up to the accelerator's rounding
