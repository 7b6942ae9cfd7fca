"""`HarmonForConditionalGeneration` end to end against the upstream fixture, on the converter's output.

Fixture items (README of `shared/fixtures/upstream-tiny`): 4.2 VAE through the model, 4.3 visual features,
4.4 understanding (features, merged embeddings, logits, greedy `generate` with its per-step logits), 4.7 one MAR
round, 4.8 the diffusion head network, 4.9 all five sampling runs through `generate_image_tokens` and through
`HarmonPipeline.__call__` with the recorded orders and noise. Then behaviour: save/load, bf16, SDPA vs eager,
activation checkpointing, Auto classes, batched and streamed generation, several images, text-only prompts, bad
placeholder counts, and the position-table resizing against an independent bilinear implementation.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fixture_utils import FIXTURE_DIR, assert_fixture_close, fixture_json, load_tensors, manifest, requires_fixture
from PIL import Image

from harmon_hf import HarmonForConditionalGeneration, HarmonPipeline, HarmonProcessor
from harmon_hf.convert import convert
from harmon_hf.modeling_mar import resize_position_table

pytestmark = requires_fixture

VAE = "vae.safetensors"
VISUAL = "visual_features.safetensors"
UND = "understanding.safetensors"
STEP = "generation_step.safetensors"
HEAD = "diffusion_head.safetensors"
I2T = "loss_image2text.safetensors"
T2I = "loss_text2image.safetensors"
SAMPLING_RUNS = tuple(fixture_json()["sampling"]["runs"]) if FIXTURE_DIR.is_dir() else ()


# ---------------------------------------------------------------------------------------------------------------
# fixtures: the fixture checkpoints converted once with our converter
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory) -> Path:
    """`harmon-hf convert` output (pipeline folder) of the fixture's harmon.pth + kl16.ckpt + llm/."""
    out = tmp_path_factory.mktemp("converted") / "harmon-tiny"
    return convert(FIXTURE_DIR / "harmon.pth", FIXTURE_DIR / "kl16.ckpt", FIXTURE_DIR / "llm", out, verbose=False)


@pytest.fixture(scope="module")
def model(converted_dir: Path) -> HarmonForConditionalGeneration:
    return HarmonForConditionalGeneration.from_pretrained(converted_dir, subfolder="model").eval()


@pytest.fixture(scope="module")
def processor(converted_dir: Path) -> HarmonProcessor:
    return HarmonProcessor.from_pretrained(converted_dir, subfolder="processor")


@pytest.fixture(scope="module")
def pipe(converted_dir: Path) -> HarmonPipeline:
    pipeline = HarmonPipeline.from_pretrained(converted_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def fixture_images() -> list[Image.Image]:
    return [Image.open(FIXTURE_DIR / "images" / f"input_{n}.png").convert("RGB") for n in ("a", "b")]


def user_turn(question: str, n_images: int = 1) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


class LLMInputs:
    """Records the keyword arguments of every call of the LLM backbone (what the model actually feeds it)."""

    def __init__(self, model: HarmonForConditionalGeneration):
        self.calls: list[dict] = []
        self._handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def __enter__(self) -> LLMInputs:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# 4.2 VAE through the model, 4.3 visual features
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_vae_through_the_model(model: HarmonForConditionalGeneration) -> None:
    vae = load_tensors(VAE)
    assert model.model.vae.dtype == torch.float32
    assert_fixture_close(model.encode_images(vae["pixel_values"]), VAE, "harmon_encode")
    assert_fixture_close(model.decode_image_tokens(vae["decode_input"]), VAE, "harmon_decode")
    # upstream divides by the scale IN PLACE; ours must leave the argument alone
    tokens = vae["decode_input"].clone()
    model.decode_image_tokens(tokens)
    torch.testing.assert_close(tokens, vae["decode_input"], atol=0, rtol=0)


@torch.no_grad()
def test_visual_features(model: HarmonForConditionalGeneration) -> None:
    vf = load_tensors(VISUAL)
    x = vf["x"]
    b, m, n, c = x.shape
    features = model.get_image_features(image_tokens=x)
    assert_fixture_close(features.last_hidden_state, VISUAL, "x_enc")
    assert_fixture_close(features.pooler_output, VISUAL, "z_enc")
    x_enc_masked = model.model.mar.encode(x.reshape(b, m * n, c), (m, n), vf["mask"])
    assert_fixture_close(x_enc_masked, VISUAL, "x_enc_masked")
    assert_fixture_close(model.model.project_visual(x_enc_masked), VISUAL, "z_enc_masked")
    # from pixels: the VAE's tokens (= x up to its tolerance) give the same features
    from_pixels = model.get_image_features(pixel_values=load_tensors(VAE)["pixel_values"])
    assert_fixture_close(from_pixels.pooler_output, VISUAL, "z_enc")


@torch.no_grad()
def test_diffusion_head_network(model: HarmonForConditionalGeneration) -> None:
    net = load_tensors(HEAD)
    head = model.model.diffusion_head
    assert_fixture_close(head.time_embed(net["net_t"]), HEAD, "net_time_embedding")
    assert_fixture_close(head(net["net_x"], net["net_t"], net["net_c"]), HEAD, "net_out")
    assert_fixture_close(head.forward_with_cfg(net["net_x"], net["net_t"], net["net_c"], 2.5), HEAD, "net_out_cfg")


# ---------------------------------------------------------------------------------------------------------------
# 4.4 understanding
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_understanding_forward(model: HarmonForConditionalGeneration, processor: HarmonProcessor) -> None:
    question = fixture_json()["understanding"]["question"]
    inputs = processor(
        text=processor.apply_chat_template(user_turn(question), add_generation_prompt=True),
        images=fixture_images()[:1],
        return_tensors="pt",
    )
    assert_fixture_close(inputs["input_ids"], UND, "input_ids")
    assert_fixture_close(inputs["pixel_values"], UND, "pixel_values")
    with LLMInputs(model) as llm:
        out = model(**inputs)
    assert_fixture_close(out.image_outputs.pooler_output, UND, "image_features")
    assert_fixture_close(llm.calls[0]["inputs_embeds"], UND, "inputs_embeds")
    assert_fixture_close(out.logits, UND, "logits")


@torch.no_grad()
def test_understanding_generate(model: HarmonForConditionalGeneration, processor: HarmonProcessor) -> None:
    und = load_tensors(UND)
    prompt_len = und["input_ids"].shape[1]
    out = model.generate(
        input_ids=und["input_ids"],
        pixel_values=und["pixel_values"],
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert_fixture_close(out.sequences[:, :prompt_len], UND, "input_ids")
    assert_fixture_close(out.sequences[:, prompt_len:], UND, "generated_ids")
    assert_fixture_close(torch.stack(out.logits, dim=1), UND, "generated_step_logits")
    # plain greedy decoding has no logits processor: the scores are the raw logits
    assert_fixture_close(torch.stack(out.scores, dim=1), UND, "generated_step_logits")
    text = processor.decode(out.sequences[0, prompt_len:], skip_special_tokens=True)
    assert text == fixture_json()["understanding"]["generated_text"]
    # upstream's own call: generate(inputs_embeds=...) with the merged embeddings (only new tokens are returned)
    out = model.generate(
        inputs_embeds=und["inputs_embeds"],
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert_fixture_close(out.sequences, UND, "generated_ids")
    assert_fixture_close(torch.stack(out.logits, dim=1), UND, "generated_step_logits")


@torch.no_grad()
def test_upstream_minus_200_placeholders(model: HarmonForConditionalGeneration) -> None:
    """Upstream training batches mark image slots with -200: the same merged embeddings as with `<image>`."""
    i2t = load_tensors(I2T)
    assert (i2t["input_ids"] == -200).any()
    for key in ("input_ids", "input_ids_image_token"):
        with LLMInputs(model) as llm:
            model(input_ids=i2t[key], pixel_values=i2t["pixel_values"], attention_mask=i2t["attention_mask"])
        assert_fixture_close(llm.calls[0]["inputs_embeds"], I2T, "inputs_embeds")


# ---------------------------------------------------------------------------------------------------------------
# 4.7 one MAR round
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True], ids=["full", "shared-encoder"])
@torch.no_grad()
def test_generation_step(model: HarmonForConditionalGeneration, shared: bool) -> None:
    step = load_tensors(STEP)
    ids, prompt_mask = step["input_ids"], step["attention_mask"]
    prefill = model.model.language_model(input_ids=ids)
    assert_fixture_close(prefill.last_hidden_state, STEP, "prefill_last_hidden_state")
    cache = model.model.prefill_prompts(ids)
    for layer in range(model.config.text_config.num_hidden_layers):
        assert_fixture_close(cache.layers[layer].keys, STEP, f"prefill_key_layer{layer}")
        assert_fixture_close(cache.layers[layer].values, STEP, f"prefill_value_layer{layer}")
    grid = tuple(fixture_json()["generation_step"]["image_shape"])
    with LLMInputs(model) as llm:
        out = model.model.mar_llm_step(
            step["tokens"], step["mask"], grid, prompt_mask, cache=cache, num_shared_rows=2 if shared else None
        )
    assert_fixture_close(out["x_enc"], STEP, "mar_x_enc")
    assert_fixture_close(out["z_enc"], STEP, "z_enc")
    n_image = out["z_enc"].shape[1]
    assert_fixture_close(out["position_ids"][:, -n_image:], STEP, "position_ids")
    assert_fixture_close(llm.calls[0]["position_ids"], STEP, "position_ids")
    assert_fixture_close(llm.calls[0]["attention_mask"], STEP, "llm_attention_mask")
    assert_fixture_close(out["llm_hidden"], STEP, "llm_image_hidden")
    assert_fixture_close(out["x_enc_residual"], STEP, "x_enc")
    assert_fixture_close(out["z"], STEP, "z")
    # the cache is cut back to the prompt: the next round sees the prefill again
    assert cache.get_seq_length() == ids.shape[1]
    assert_fixture_close(cache.layers[0].keys, STEP, "prefill_key_layer0")


# ---------------------------------------------------------------------------------------------------------------
# 4.9 full sampling runs
# ---------------------------------------------------------------------------------------------------------------
def sampling_inputs(run: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(run facts from fixtures.json, tensors, generate_image_tokens keyword arguments with the injected values)."""
    facts = fixture_json()["sampling"]["runs"][run]
    tensors = load_tensors(f"sampling_{run}.safetensors")
    n = facts["num_iter"]
    kwargs = dict(
        num_iter=n,
        guidance_scale=facts["cfg"],
        guidance_schedule=facts["cfg_schedule"],
        temperature=facts["temperature"],
        orders=tensors["orders"],
        init_noise=[tensors[f"step{s}_init_noise"] for s in range(n)],
        step_noise=[tensors[f"step{s}_step_noise"] for s in range(n)] if facts["temperature"] else None,
    )
    return facts, tensors, kwargs


def sampling_prompts() -> list[str]:
    """The captions of the conditional rows of the sampling runs (inside `Generate an image: ...`)."""
    texts = fixture_json()["sampling"]["prompt_texts"]
    return [m.group(1) for t in texts if (m := re.search(r"Generate an image: (.*?)<\|im_end\|>", t))]


def uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Upstream's scripts/text2image.py: clamp(127.5 x + 128, 0, 255) truncated to uint8."""
    return torch.clamp(127.5 * images + 128, 0, 255).to(torch.uint8)


@pytest.mark.parametrize("run", SAMPLING_RUNS)
@torch.no_grad()
def test_sampling_run_generate_image_tokens(model: HarmonForConditionalGeneration, run: str) -> None:
    facts, tensors, kwargs = sampling_inputs(run)
    name = f"sampling_{run}.safetensors"
    grid = tuple(fixture_json()["sampling"]["image_shape"])
    use_cfg = facts["cfg"] != 1
    rep = 2 if use_cfg else 1
    tokens, rounds = model.generate_image_tokens(
        tensors["input_ids"], tensors["attention_mask"], grid, return_intermediates=True, **kwargs
    )
    assert len(rounds) == facts["num_iter"]
    for s, (got, want) in enumerate(zip(rounds, facts["steps"])):
        assert_fixture_close(got["mask"].repeat(rep, 1).long(), name, f"step{s}_mask")
        assert_fixture_close(got["mask_to_pred"].repeat(rep, 1).long(), name, f"step{s}_mask_to_pred")
        assert_fixture_close(got["cond_z"], name, f"step{s}_cond_z")
        assert_fixture_close(got["sampled"], name, f"step{s}_sampled")
        assert got["scale"] == pytest.approx(want["cfg_iter"], rel=1e-12)
    # with guidance the unconditional rows are copies of the conditional ones (orders and tokens)
    assert_fixture_close(tensors["orders"][: tokens.shape[0]].repeat(rep, 1), name, "orders_effective")
    assert_fixture_close(tokens.repeat(rep, 1, 1, 1), name, "tokens")
    images = model.decode_image_tokens(tokens)
    assert_fixture_close(images, name, "images")
    assert_fixture_close(uint8_levels(images), name, "images_uint8")

    # the production path (no intermediates kept) gives the same tokens
    fast = model.generate_image_tokens(tensors["input_ids"], tensors["attention_mask"], grid, **kwargs)
    assert_fixture_close(fast.repeat(rep, 1, 1, 1), name, "tokens")


@pytest.mark.parametrize("run", SAMPLING_RUNS)
def test_sampling_run_pipeline(pipe: HarmonPipeline, run: str) -> None:
    facts, tensors, kwargs = sampling_inputs(run)
    name = f"sampling_{run}.safetensors"
    prompts = sampling_prompts()
    # the pipeline's prompt batch is upstream's
    batch = pipe.processor.build_t2i_prompts(prompts, add_unconditional=facts["cfg"] != 1)
    assert_fixture_close(batch["input_ids"], name, "input_ids")
    assert_fixture_close(batch["attention_mask"], name, "attention_mask")
    call = dict(
        height=64,
        width=64,
        num_inference_steps=kwargs["num_iter"],
        guidance_scale=kwargs["guidance_scale"],
        guidance_schedule=kwargs["guidance_schedule"],
        temperature=kwargs["temperature"],
        orders=kwargs["orders"],
        diffusion_init_noise=kwargs["init_noise"],
        diffusion_step_noise=kwargs["step_noise"],
    )
    n = len(prompts)
    latents = pipe(prompts, output_type="latent", **call).images
    assert_fixture_close(torch.cat([latents, latents])[: tensors["tokens"].shape[0]], name, "tokens")
    pt = pipe(prompts, output_type="pt", **call).images
    expected = ((tensors["images"] + 1) / 2).clamp(0, 1)  # "pt" is [0, 1], clamped
    atol = manifest()["tensor_files"][name]["tensors"]["images"]["atol"]
    torch.testing.assert_close(pt, expected, atol=atol / 2, rtol=1e-5)
    # PIL levels: round(255 * (x/2 + 1/2)) equals upstream's truncation of 127.5 x + 128
    pil = pipe(prompts, output_type="pil", **call).images
    assert len(pil) == n and all(p.size == (64, 64) and p.mode == "RGB" for p in pil)
    levels = torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2)
    assert_fixture_close(levels, name, "images_uint8")


def test_mask_schedule_matches_fixture() -> None:
    for facts in fixture_json()["sampling"]["runs"].values():
        schedule = HarmonForConditionalGeneration.mask_schedule(16, facts["num_iter"])
        recorded = [int(s["mask_len_after"]) for s in facts["steps"]]
        assert schedule[:-1] == recorded[:-1] and schedule[-1] == 0  # the last round predicts everything left
    for length in (1, 4, 16, 256, 1024):
        for num_iter in sorted({1, 2, 7, 64, length}):
            if num_iter > length:
                continue
            schedule = HarmonForConditionalGeneration.mask_schedule(length, num_iter)
            masked = [length, *schedule]
            assert len(schedule) == num_iter and schedule[-1] == 0
            assert all(a > b for a, b in zip(masked, masked[1:])), (length, num_iter, schedule)


@torch.no_grad()
def test_more_rounds_than_tokens_are_clamped(model: HarmonForConditionalGeneration, caplog) -> None:
    ids = load_tensors(STEP)["input_ids"]
    rounds = []
    tokens = model.generate_image_tokens(
        ids,
        torch.ones_like(ids),
        (2, 2),
        num_iter=9,
        num_diffusion_steps=2,
        generator=torch.Generator().manual_seed(0),
        callback=lambda s, t: rounds.append(int(t["mask"].sum())),
    )
    assert tokens.shape == (2, 2, 2, 16) and torch.isfinite(tokens).all()
    assert rounds == [6, 4, 2, 0]  # 4 rounds for 4 tokens, one token per image per round
    with pytest.raises(ValueError, match="num_iter"):
        model.generate_image_tokens(ids, torch.ones_like(ids), (2, 2), num_iter=0)


# ---------------------------------------------------------------------------------------------------------------
# position tables for other grids
# ---------------------------------------------------------------------------------------------------------------
def bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize `(h, w, C)` -> `(out_h, out_w, C)` with half-pixel centres (align_corners=False, edge
    clamping), written out with explicit loops in float64."""
    h, w, _ = image.shape
    out = np.zeros((out_h, out_w, image.shape[2]))
    for i in range(out_h):
        y = max((i + 0.5) * h / out_h - 0.5, 0.0)
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = max((j + 0.5) * w / out_w - 0.5, 0.0)
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
            bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize("size", [(8, 8), (4, 2), (2, 6), (3, 5), (4, 4)])
def test_position_table_resize_is_bilinear(size: tuple[int, int]) -> None:
    grid, buffer, channels = 4, 3, 5
    table = torch.randn(1, buffer + grid * grid, channels, generator=torch.Generator().manual_seed(0))
    resized = resize_position_table(table, grid, size, buffer)
    m, n = size
    assert resized.shape == (1, buffer + m * n, channels)
    torch.testing.assert_close(resized[:, :buffer], table[:, :buffer], atol=0, rtol=0)
    image = table[0, buffer:].reshape(grid, grid, channels).double().numpy()
    expected = torch.from_numpy(bilinear_reference(image, m, n)).reshape(1, m * n, channels).float()
    torch.testing.assert_close(resized[:, buffer:], expected, atol=1e-6, rtol=1e-6)
    # the diffusion table has no buffer rows
    no_buffer = resize_position_table(table[:, buffer:], grid, size, 0)
    torch.testing.assert_close(no_buffer, resized[:, buffer:], atol=0, rtol=0)


@torch.no_grad()
def test_non_square_grid_uses_resized_tables(model: HarmonForConditionalGeneration) -> None:
    """A 4x2 grid (64x32 px): encoder/decoder run on the resized tables; features of a 64x32 image."""
    mar = model.model.mar
    buffer = model.config.buffer_size
    tokens = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    x_enc = mar.encode(tokens, (4, 2))
    assert x_enc.shape == (1, buffer + 8, 32)
    z = mar.decode(x_enc, (4, 2))
    assert z.shape == (1, 8, 32) and torch.isfinite(z).all()
    features = model.get_image_features(pixel_values=torch.zeros(1, 3, 64, 32))
    assert features.pooler_output.shape == (1, 8 + buffer, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.get_image_features(pixel_values=torch.zeros(1, 3, 64, 40))


# ---------------------------------------------------------------------------------------------------------------
# behaviour
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_save_load_round_trip_is_bit_exact(model: HarmonForConditionalGeneration, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path)
    loaded = HarmonForConditionalGeneration.from_pretrained(tmp_path).eval()
    before, after = model.state_dict(), loaded.state_dict()
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # still tied
    und = load_tensors(UND)
    a = model(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits
    b = loaded(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits
    assert torch.equal(a, b)
    _, tensors, kwargs = sampling_inputs("cfg3_const_temp1_iter4")
    grid = (4, 4)
    ta = model.generate_image_tokens(tensors["input_ids"], tensors["attention_mask"], grid, **kwargs)
    tb = loaded.generate_image_tokens(tensors["input_ids"], tensors["attention_mask"], grid, **kwargs)
    assert torch.equal(ta, tb)


@torch.no_grad()
def test_bfloat16_loads_and_runs(converted_dir: Path) -> None:
    model = HarmonForConditionalGeneration.from_pretrained(
        converted_dir, subfolder="model", dtype=torch.bfloat16, device_map="cpu"
    )
    model.eval()
    assert model.device.type == "cpu"
    assert {p.dtype for n, p in model.named_parameters() if n.startswith("model.vae.")} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("model.vae.")} == {torch.bfloat16}
    und = load_tensors(UND)
    logits = model(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    out = model.generate(input_ids=und["input_ids"], pixel_values=und["pixel_values"], max_new_tokens=3)
    assert out.shape == (1, und["input_ids"].shape[1] + 3)
    ids = load_tensors(STEP)["input_ids"]
    tokens = model.generate_image_tokens(
        ids,
        load_tensors(STEP)["attention_mask"],
        (4, 4),
        num_iter=2,
        num_diffusion_steps=3,
        generator=torch.Generator().manual_seed(0),
    )
    images = model.decode_image_tokens(tokens)
    assert tokens.shape == (2, 4, 4, 16) and images.dtype == torch.float32 and torch.isfinite(images).all()


@torch.no_grad()
def test_sdpa_and_eager_attention_agree(converted_dir: Path, model: HarmonForConditionalGeneration) -> None:
    eager = HarmonForConditionalGeneration.from_pretrained(
        converted_dir, subfolder="model", attn_implementation="eager"
    ).eval()
    assert model.config._attn_implementation == "sdpa"
    assert eager.model.mar.config._attn_implementation == "eager"
    assert eager.model.language_model.config._attn_implementation == "eager"
    und = load_tensors(UND)
    for m in (model, eager):
        assert_fixture_close(m(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits, UND, "logits")
        step = load_tensors(STEP)
        out = m.model.mar_llm_step(
            step["tokens"],
            step["mask"],
            (4, 4),
            step["attention_mask"],
            cache=m.model.prefill_prompts(step["input_ids"]),
        )
        assert_fixture_close(out["z"], STEP, "z")


def test_activation_checkpointing_same_loss_and_gradients(converted_dir: Path) -> None:
    i2t, t2i = load_tensors(I2T), load_tensors(T2I)

    def run(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = HarmonForConditionalGeneration.from_pretrained(converted_dir, subfolder="model")
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()  # dropout on: checkpointing must replay the same masks
        torch.manual_seed(0)
        out = model(
            input_ids=i2t["input_ids_image_token"],
            pixel_values=i2t["pixel_values"],
            attention_mask=i2t["attention_mask"],
            labels=i2t["labels"],
            generation_input_ids=t2i["input_ids"],
            generation_attention_mask=t2i["attention_mask"],
            generation_pixel_values=t2i["pixel_values"],
            generation_mask=t2i["mask"],
            diffusion_timesteps=t2i["t"],
            diffusion_noise=t2i["noise"],
        )
        out.loss.backward()
        if checkpointing:
            flagged = [n for n, mod in model.named_modules() if getattr(mod, "gradient_checkpointing", False)]
            assert "model.mar.encoder_blocks.0" in flagged and "model.language_model.layers.0" in flagged
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run(False)
    loss_ckpt, grads_ckpt = run(True)
    assert torch.equal(loss, loss_ckpt)
    assert set(grads) == set(grads_ckpt) and len(grads) > 100
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_auto_classes_load_the_converted_folder(converted_dir: Path) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from harmon_hf import HarmonConfig, HarmonModel

    assert isinstance(AutoConfig.from_pretrained(converted_dir, subfolder="model"), HarmonConfig)
    assert isinstance(AutoModel.from_pretrained(converted_dir, subfolder="model"), HarmonModel)
    model = AutoModelForImageTextToText.from_pretrained(converted_dir, subfolder="model")
    assert isinstance(model, HarmonForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(converted_dir, subfolder="processor"), HarmonProcessor)
    und = load_tensors(UND)
    with torch.no_grad():
        assert_fixture_close(model(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits, UND, "logits")


@torch.no_grad()
def test_left_padded_batch_equals_each_alone(model: HarmonForConditionalGeneration, processor: HarmonProcessor) -> None:
    images = fixture_images()
    questions = ["Describe the image.", "What is in the picture? Tell me about the colours, please."]
    texts = [processor.apply_chat_template(user_turn(q), add_generation_prompt=True) for q in questions]
    batch = processor(text=texts, images=images, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] != lengths[1] and (batch["attention_mask"][:, -1] == 1).all()  # left padding
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for i, (text, image) in enumerate(zip(texts, images)):
        alone = processor(text=text, images=[image], return_tensors="pt")
        ref = model.generate(**alone, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[i, batch["input_ids"].shape[1] :], ref[0, alone["input_ids"].shape[1] :])


def test_text_iterator_streamer(model: HarmonForConditionalGeneration, processor: HarmonProcessor) -> None:
    from transformers import TextIteratorStreamer

    und = load_tensors(UND)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=und["input_ids"], pixel_values=und["pixel_values"], max_new_tokens=8, do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs=dict(kwargs, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 1
    assert "".join(pieces) == fixture_json()["understanding"]["generated_text"]


@torch.no_grad()
def test_sampling_and_beam_settings(model: HarmonForConditionalGeneration) -> None:
    und = load_tensors(UND)
    inputs = dict(input_ids=und["input_ids"], pixel_values=und["pixel_values"], max_new_tokens=4)
    prompt_len = und["input_ids"].shape[1]
    greedy = model.generate(**inputs, do_sample=False)
    assert torch.equal(greedy[:, prompt_len:], und["generated_ids"][:, :4])
    torch.manual_seed(0)
    top1 = model.generate(**inputs, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(top1, greedy)  # top-1 sampling is greedy decoding
    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, top_p=0.9, temperature=1.3, num_return_sequences=3)
    assert sampled.shape == (3, prompt_len + 4) and (sampled[:, :prompt_len] == und["input_ids"]).all()
    beams = model.generate(
        **inputs, num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True
    )
    assert beams.sequences.shape == (2, prompt_len + 4)
    assert (beams.sequences[:, :prompt_len] == und["input_ids"]).all()
    assert beams.sequences_scores[0] >= beams.sequences_scores[1]
    one_beam = model.generate(**inputs, num_beams=1, do_sample=False)
    assert torch.equal(one_beam, greedy)


@torch.no_grad()
def test_several_images_and_text_only(model: HarmonForConditionalGeneration, processor: HarmonProcessor) -> None:
    images = fixture_images()
    text = processor.apply_chat_template(user_turn("Compare them.", 2), add_generation_prompt=True)
    inputs = processor(text=text, images=images, return_tensors="pt")
    per_image = processor.num_image_tokens()
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * per_image
    with LLMInputs(model) as llm:
        model(**inputs)
    embeds = llm.calls[0]["inputs_embeds"][0]
    slots = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    features = [
        model.get_image_features(pixel_values=inputs["pixel_values"][i : i + 1]).pooler_output[0] for i in (0, 1)
    ]
    # in order, each image's own features (batched convolutions may round differently from single ones: measured
    # up to 2e-5 with the VAE on channels-last activations; another image's features differ by far more)
    torch.testing.assert_close(embeds[slots[:per_image]], features[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeds[slots[per_image:]], features[1], atol=1e-4, rtol=1e-4)
    assert (features[0] - features[1]).abs().max() > 1e-2
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)

    # text only: exactly the LLM with its head
    text = processor.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt")
    assert "pixel_values" not in inputs
    logits = model(**inputs).logits
    plain = model.lm_head(model.model.language_model(input_ids=inputs["input_ids"]).last_hidden_state)
    torch.testing.assert_close(logits, plain, atol=0, rtol=0)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


@torch.no_grad()
def test_wrong_image_counts_raise(model: HarmonForConditionalGeneration, processor: HarmonProcessor) -> None:
    und = load_tensors(UND)
    ids, pixels = und["input_ids"], und["pixel_values"]
    with pytest.raises(ValueError, match=r"24 <image> placeholder tokens but the images give 48"):
        model(input_ids=ids, pixel_values=torch.cat([pixels, pixels]))
    with pytest.raises(ValueError, match=r"23 <image> placeholder tokens but the images give 24"):
        model(input_ids=_drop_one_placeholder(ids, model), pixel_values=pixels)
    with pytest.raises(ValueError, match=r"24 <image> placeholder tokens but no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"24 <image> placeholder tokens but no pixel_values"):
        model.generate(input_ids=ids, max_new_tokens=2)
    # the processor refuses markers that do not match the images
    text = processor.apply_chat_template(user_turn("Two?", 2), add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) but 1 image"):
        processor(text=text, images=fixture_images()[:1])
    with pytest.raises(ValueError, match=r"no images were passed"):
        processor(text=text)


def _drop_one_placeholder(ids: torch.Tensor, model: HarmonForConditionalGeneration) -> torch.Tensor:
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    return torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)


def test_fresh_model_uses_upstream_initialisation() -> None:
    """From scratch (no weights loaded): MAR and head linears Xavier-uniform, the head's timestep MLP N(0, 0.02),
    adaLN-zero (head blocks start as identities, output zero), MAR tables N(0, initializer_range). (That loading a
    checkpoint re-initialises nothing is what the fixture-parity and round-trip tests above check.)"""
    from harmon_hf import HarmonConfig

    torch.manual_seed(0)
    model = HarmonForConditionalGeneration(HarmonConfig.tiny()).requires_grad_(False)
    mar, head = model.model.mar, model.model.diffusion_head
    qkv = mar.encoder_blocks[0].attn.qkv
    fan_in, fan_out = qkv.weight.shape[1], qkv.weight.shape[0]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert qkv.weight.abs().max() <= bound and qkv.weight.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(qkv.bias) == 0
    mlp = head.res_blocks[0].mlp[0]
    assert mlp.weight.std() == pytest.approx(math.sqrt(2.0 / sum(mlp.weight.shape)), rel=0.1)
    assert head.time_embed.mlp[0].weight.std() == pytest.approx(0.02, rel=0.1)
    for layer in [block.adaLN_modulation[-1] for block in head.res_blocks] + [
        head.final_layer.adaLN_modulation[-1],
        head.final_layer.linear,
    ]:
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0
    with torch.no_grad():  # adaLN-zero: the untrained head predicts zeros
        out = head(
            torch.randn(3, head.config.in_channels),
            torch.tensor([1, 500, 999]),
            torch.randn(3, head.config.cond_channels),
        )
    assert torch.count_nonzero(out) == 0
    std = model.config.mar_config.initializer_range
    assert mar.decoder_pos_embed_learned.std() == pytest.approx(std, rel=0.2)
    # the LLM keeps transformers' N(0, initializer_range) init
    up = model.model.language_model.layers[0].mlp.up_proj.weight
    assert up.std() == pytest.approx(model.config.text_config.initializer_range, rel=0.1)


def test_training_mask_ratio_bounds() -> None:
    """The training mask covers ceil(L * ratio) tokens with the ratio in [mask_ratio_min, 1]; mask_ratio_min = 1
    masks every token (it used to wait forever for a normal draw of exactly 0); out-of-range settings are refused."""
    from harmon_hf import HarmonConfig, HarmonMARConfig

    config = HarmonConfig.tiny()
    model = HarmonForConditionalGeneration(config).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    counts = {int(model.sample_training_mask(2, 16, gen).sum(1)[0]) for _ in range(200)}
    assert counts <= set(range(math.ceil(16 * config.mar_config.mask_ratio_min), 17)) and len(counts) > 2
    config.mar_config.mask_ratio_min = 1.0
    full = HarmonForConditionalGeneration(config).requires_grad_(False)
    assert torch.equal(full.sample_training_mask(3, 16, gen), torch.ones(3, 16))
    for bad, message in (
        (dict(mask_ratio_min=1.5), "mask_ratio_min must be in \\[0, 1\\], got 1.5"),
        (dict(mask_ratio_min=-0.1), "mask_ratio_min must be in \\[0, 1\\], got -0.1"),
        (dict(mask_ratio_std=0.0), "mask_ratio_std must be a finite number > 0, got 0.0"),
    ):
        with pytest.raises(ValueError, match=message):
            HarmonMARConfig(**bad)
