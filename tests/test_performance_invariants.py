"""The speed-ups of docs/performance.md against straightforward reference paths (outputs, not timings).

- The adaLN modulations hoisted out of the diffusion head's step loop (`forward_modulated`, batched over steps in
  `sample_tokens`) compute the upstream formula (bitwise at the same shapes; in float64 the whole sampling loop is
  bitwise that of the per-step path).
- `conditional_only` (no scheduler step for the never-read unconditional half) keeps the conditional rows bitwise.
- The scheduler's cached coefficients and skipped variance keep `step` bitwise equal to `p_mean_variance`.
- The fused sampling step (`HarmonDiffusionHead.inference_body`, `FusedReverseSteps`: fewer, fused tensor
  operations per head step) computes `forward_modulated` / `step` up to float32 rounding, and steps aside for
  heads with hooks or adapters and for scheduler configurations it does not cover.
- `generate_image_tokens` without intermediates (the fast path) gives the tokens of the full-row path bitwise.
- Pipeline chunking (`max_batch_size`) and sliced VAE decoding give the images of one call (up to float rounding:
  batched GEMMs may round differently from smaller ones).
"""

from __future__ import annotations

import pytest
import torch
from tiny_model import fast_pipeline_dir, requires_tiny

from harmon_hf import HarmonConfig, HarmonForConditionalGeneration
from harmon_hf.configuration_harmon import HarmonDiffusionHeadConfig
from harmon_hf.modeling_diffusion_head import HarmonDiffusionHead
from harmon_hf.scheduling_harmon import HarmonDDPMScheduler, sample_tokens


def random_head(width: int = 64, blocks: int = 2, cond: int = 32, seed: int = 0) -> HarmonDiffusionHead:
    """A head with every weight random (the adaLN / output layers are zero-initialised otherwise)."""
    torch.manual_seed(seed)
    head = HarmonDiffusionHead(
        HarmonDiffusionHeadConfig(model_channels=width, num_res_blocks=blocks, cond_channels=cond)
    )
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0.0, 0.15 if param.ndim == 2 else 0.05)
    return head.eval()


def reference_head_forward(head: HarmonDiffusionHead, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor):
    """Upstream's `SimpleMLPAdaLN.forward` written out plainly (modulation recomputed inside every block)."""
    y = head.time_embed(t) + head.cond_embed(c)
    h = head.input_proj(x)
    for block in head.res_blocks:
        shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
        h = h + gate * block.mlp(block.in_ln(h) * (1 + scale) + shift)
    shift, scale = head.final_layer.adaLN_modulation(y).chunk(2, dim=-1)
    return head.final_layer.linear(head.final_layer.norm_final(h) * (1 + scale) + shift)


@torch.no_grad()
def test_modulated_head_is_the_upstream_formula() -> None:
    head = random_head()
    x, c = torch.randn(6, 16), torch.randn(6, 32)
    t = torch.tensor([999, 500, 10, 0, 3, 77])
    assert torch.equal(head(x, t, c), reference_head_forward(head, x, t, c))
    y = head.embed_condition(t, c)
    assert torch.equal(head.forward_modulated(x, head.modulations(y)), head.forward_embedded(x, y))


@torch.no_grad()
def test_modulations_batched_over_steps_match_per_step() -> None:
    head = random_head(width=256, blocks=3, cond=256)
    t_emb = head.time_embed(torch.arange(0, 1000, 100))
    c_emb = head.cond_embed(torch.randn(10, 256))
    batched = head.modulations(t_emb[:, None, :] + c_emb[None])
    for j in range(len(t_emb)):
        single = head.modulations(t_emb[j] + c_emb)
        for group_b, group_s in zip(batched, single):
            for b, s in zip(group_b, group_s):
                # one large GEMM vs one per step: the same sums, possibly rounded in another order (float32
                # rounding of sums of 256 terms: a few 1e-7 of the values' scale)
                torch.testing.assert_close(b[j], s, rtol=0, atol=1e-6 * float(s.abs().max()))


@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hoisted_sampling_loop_is_the_per_step_loop_in_float64(temperature: float) -> None:
    """In float64 a GEMM's summation order is invisible after the float32 rounding of the head's output, so the
    hoisted loop (modulations of many steps per call) and the per-step loop must agree bitwise."""
    head = random_head().double()
    cond = torch.randn(8, 32, dtype=torch.float64)
    runs = [
        sample_tokens(
            head,
            cond,
            HarmonDDPMScheduler(),
            guidance_scale=3.0,
            temperature=temperature,
            generator=torch.Generator().manual_seed(0),
            hoist_modulations=hoist,
        )
        for hoist in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


@torch.no_grad()
@pytest.mark.parametrize("knob, value", [("MODULATION_CHUNK_BYTES", 1), ("MODULATION_ROWS_PER_CHANNEL", 0)])
def test_hoisting_respects_the_chunk_budget(monkeypatch, knob: str, value: int) -> None:
    """A tiny chunk budget (one step per chunk, by bytes or by rows) gives what one chunk of all steps gives."""
    import harmon_hf.scheduling_harmon as sched

    head = random_head().double()
    cond = torch.randn(4, 32, dtype=torch.float64)
    calls = []
    modulations = head.modulations
    monkeypatch.setattr(head, "modulations", lambda y: calls.append(y.shape[0]) or modulations(y))

    def run() -> torch.Tensor:
        calls.clear()
        return sample_tokens(head, cond, HarmonDDPMScheduler(), 20, 2.0, generator=torch.Generator().manual_seed(1))

    whole = run()
    assert calls == [20]  # width 64 x 4 rows per channel = 256 rows wanted: all 20 steps of 4 rows in one product
    monkeypatch.setattr(sched, knob, value)
    assert torch.equal(run(), whole)
    assert calls == [1] * 20


def test_modulation_chunks_aim_at_rows_per_channel_within_the_byte_budget() -> None:
    """`modulation_chunk_steps`: the fewest steps whose rows reach `MODULATION_ROWS_PER_CHANNEL` x width, unless the
    step count or the byte budget stops it first; always 1..num_steps and within the budget (or a single step)."""
    from harmon_hf.scheduling_harmon import (
        MODULATION_CHUNK_BYTES,
        MODULATION_ROWS_PER_CHANNEL,
        modulation_chunk_steps,
    )

    for width in (64, 256, 1024, 1536):
        target = MODULATION_ROWS_PER_CHANNEL * width
        for rows in (1, 2, 8, 32, 100, 256, 512, 4096, 10**6):
            per_step = rows * width * 11 * 2  # 3 blocks + final layer, bfloat16
            for num_steps in (1, 20, 100):
                k = modulation_chunk_steps(rows, width, per_step, num_steps)
                assert 1 <= k <= num_steps
                assert k == 1 or k * per_step <= MODULATION_CHUNK_BYTES
                assert (k - 1) * rows < target  # no more steps than the target needs
                if k < num_steps and (k + 1) * per_step <= MODULATION_CHUNK_BYTES:
                    assert k * rows >= target  # neither limit stopped it: the target is reached
    # the benchmark's small head at batch 8 (256 rows): 4 steps of 256 rows, not the 46 the byte budget allows
    assert modulation_chunk_steps(256, 256, 256 * 256 * 11 * 2, 100) == 4


@torch.no_grad()
@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize(
    "noise", ["generator", "generator_list", "injected", "temperature0", "ddim", "dpm_sde"], ids=str
)
def test_conditional_only_keeps_the_conditional_rows(noise: str, hoist: bool) -> None:
    head = random_head()
    n = 3
    cond = torch.randn(2 * n, 32)
    scheduler = HarmonDDPMScheduler()
    kwargs: dict = dict(guidance_scale=4.0, hoist_modulations=hoist)
    steps = 100
    if noise == "ddim":
        scheduler, steps = scheduler.compatible_scheduler("DDIMScheduler"), 10
    elif noise == "dpm_sde":
        scheduler = scheduler.compatible_scheduler("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++")
        steps = 10

    def make_kwargs() -> dict:
        out = dict(kwargs)
        if noise == "generator_list":
            out["generator"] = [torch.Generator().manual_seed(s) for s in range(n)]
        elif noise == "injected":
            out["init_noise"] = torch.randn(n, 16, generator=torch.Generator().manual_seed(5))
            out["step_noise"] = torch.randn(steps, 2 * n, 16, generator=torch.Generator().manual_seed(6))
        elif noise == "temperature0":
            out["generator"] = torch.Generator().manual_seed(2)
            out["temperature"] = 0.0
        else:
            out["generator"] = torch.Generator().manual_seed(3)
        return out

    full = sample_tokens(head, cond, scheduler, steps, **make_kwargs())
    fast = sample_tokens(head, cond, scheduler, steps, conditional_only=True, **make_kwargs())
    assert fast.shape == (n, 16)
    assert torch.equal(fast, full[:n])


@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_cached_step_coefficients_keep_step_exact(temperature: float) -> None:
    scheduler = HarmonDDPMScheduler()
    scheduler.set_timesteps(100)
    torch.manual_seed(0)
    x, out, noise = torch.randn(5, 16), torch.randn(5, 32), torch.randn(5, 16)
    for t in (999, 989, 10, 0):
        mean, log_var, pred_x0 = scheduler.p_mean_variance(out, t, x)
        for _ in range(2):  # the second call uses the cached coefficients
            prev = scheduler.step(out, t, x, temperature=temperature, variance_noise=noise)
            expected = mean if temperature == 0 or t == 0 else mean + torch.exp(0.5 * log_var) * noise * temperature
            assert torch.equal(prev.prev_sample, expected)
            assert torch.equal(prev.pred_original_sample, pred_x0)


@torch.no_grad()
def test_inference_body_is_forward_modulated() -> None:
    head = random_head(width=128, blocks=3)
    x, c = torch.randn(6, 16), torch.randn(6, 32)
    mods = head.modulations(head.embed_condition(torch.tensor([999, 500, 10, 0, 3, 77]), c))
    body = head.inference_body()
    assert body is not None
    expected = head.forward_modulated(x, mods)
    # fused multiply-adds round once instead of twice: float32 rounding of the values' scale
    torch.testing.assert_close(body(x, mods), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    # the closure reads the weights it was built with, not copies
    head.final_layer.linear.bias.add_(1.0)
    torch.testing.assert_close(body(x, mods), expected + 1.0, rtol=0, atol=1e-5 * float(expected.abs().max()))


@torch.no_grad()
def test_inference_body_steps_aside_for_hooks_and_adapters() -> None:
    head = random_head()
    cond = torch.randn(4, 32)

    def run() -> torch.Tensor:
        return sample_tokens(head, cond, HarmonDDPMScheduler(), 10, 2.0, generator=torch.Generator().manual_seed(0))

    plain = run()
    calls = []
    handle = head.res_blocks[0].mlp[0].register_forward_hook(lambda mod, inp, out: calls.append(1))
    assert head.inference_body() is None
    hooked = run()  # through forward_modulated: the hook sees every step
    handle.remove()
    assert len(calls) == 10
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)  # values up to ~1e4: unclipped random head

    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["mlp.0"]), head)
    assert head.inference_body() is None


@torch.no_grad()
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_fused_reverse_steps_are_step(clip: bool, temperature: float) -> None:
    scheduler = HarmonDDPMScheduler(clip_sample=clip, clip_sample_range=2.0)
    scheduler.set_timesteps(100)
    fused = scheduler.fused_reverse_steps()
    gen = torch.Generator().manual_seed(0)
    for j, t in enumerate(scheduler.timesteps.tolist()):
        x = 3 * torch.randn(5, 16, generator=gen)
        out = torch.randn(5, 32, generator=gen)
        out[:, 16:].clamp_(-1, 1)
        noise = torch.randn(5, 16, generator=gen) if j != 99 else None
        expected = scheduler.step(out, t, x, temperature=temperature, variance_noise=noise).prev_sample
        got = fused(j, out[:, :16], out[:, 16:], x, noise, temperature)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m, t=t: f"t={t}: {m}")


def test_fused_reverse_steps_only_for_what_they_cover() -> None:
    assert HarmonDDPMScheduler(prediction_type="sample").fused_reverse_steps() is None
    assert HarmonDDPMScheduler(variance_type="fixed_small").fused_reverse_steps() is None
    assert HarmonDDPMScheduler(thresholding=True).fused_reverse_steps() is None
    scheduler = HarmonDDPMScheduler()
    scheduler.set_timesteps(20)
    first = scheduler.fused_reverse_steps()
    scheduler.set_timesteps(20)
    assert scheduler.fused_reverse_steps() is first  # built once, not every MAR round
    scheduler.set_timesteps(10)
    assert scheduler.fused_reverse_steps().num_steps == 10


@torch.no_grad()
def test_sampling_falls_back_to_step_for_other_configs() -> None:
    """A configuration the fused step does not cover samples through `step` (here: x_0 prediction)."""
    head = random_head()
    cond = torch.randn(4, 32)
    scheduler = HarmonDDPMScheduler(prediction_type="sample")
    got = sample_tokens(
        head, cond, scheduler, 5, 2.0, temperature=0.0, init_noise=torch.zeros(2, 16), conditional_only=True
    )
    x = torch.zeros(2, 16)
    scheduler.set_timesteps(5)
    for t in scheduler.timesteps.tolist():
        out = head.forward_with_cfg(torch.cat([x, x]), torch.tensor(t), cond, 2.0)[:2]
        x = scheduler.step(out, t, x, temperature=0.0).prev_sample
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)


def _tiny_model() -> HarmonForConditionalGeneration:
    torch.manual_seed(0)
    model = HarmonForConditionalGeneration(HarmonConfig.tiny()).eval()
    with torch.no_grad():  # the default init zeroes the head's output layers: make every part matter
        for param in model.model.diffusion_head.parameters():
            param.normal_(0.0, 0.1)
    return model


@torch.no_grad()
@pytest.mark.parametrize("guidance_schedule", ["constant", "linear"])
def test_fast_generation_path_matches_the_full_row_path(guidance_schedule: str) -> None:
    """Without intermediates `generate_image_tokens` skips the unconditional half's scheduler steps."""
    model = _tiny_model()
    ids = torch.randint(0, 400, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def run(intermediates: bool):
        return model.generate_image_tokens(
            ids,
            mask,
            (4, 4),
            num_iter=4,
            guidance_scale=3.0,
            guidance_schedule=guidance_schedule,
            num_diffusion_steps=20,
            generator=[torch.Generator().manual_seed(s) for s in range(2)],
            return_intermediates=intermediates,
        )

    fast = run(False)
    full, _ = run(True)
    assert torch.equal(fast, full)


@requires_tiny
@torch.no_grad()
def test_chunked_pipeline_matches_one_call() -> None:
    from harmon_hf import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(fast_pipeline_dir())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cube", "a small green cat in a big field", "blue"]

    def run(**kwargs) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(6)]
        return pipe(
            prompts, num_images_per_prompt=2, num_inference_steps=4, generator=gens, output_type="pt", **kwargs
        ).images

    one_call = run(max_batch_size=None, vae_batch_size=6)
    for kwargs in (dict(max_batch_size=4), dict(max_batch_size=1), dict(max_batch_size=None, vae_batch_size=1)):
        images = run(**kwargs)
        assert images.shape == one_call.shape == (6, 3, 64, 64)
        # same images up to float rounding (measured <= 1e-5 on [0, 1] pixels; one grey level is 4e-3)
        torch.testing.assert_close(images, one_call, atol=2e-4, rtol=0)


@requires_tiny
def test_chunking_rejects_bad_values_and_injected_noise() -> None:
    from harmon_hf import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(fast_pipeline_dir())
    with pytest.raises(ValueError, match="max_batch_size"):
        pipe("a", max_batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="vae_batch_size"):
        pipe("a", vae_batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="injected diffusion noise"):
        pipe(["a", "b"], max_batch_size=1, num_inference_steps=2, diffusion_init_noise=[torch.zeros(2, 16)] * 2)


def test_channels_last_gives_dense_strides() -> None:
    """`channels_last` returns dense channels-last strides `(C*H*W, 1, W*C, C)`, also for one picture whose batch
    stride is odd (such a view counts as channels-last for `Tensor.contiguous`, which then returns it unchanged, and
    the VAE's convolutions took their slow plain layout: 0.50 s instead of 0.23 s per 256 px bfloat16 decode)."""
    from harmon_hf.modeling_harmon import channels_last

    odd = torch.randn(4, 4, 1, 3).permute(2, 3, 0, 1)  # (1, 3, 4, 4) with batch stride 3
    assert odd.contiguous(memory_format=torch.channels_last).stride() == (3, 1, 12, 3)
    for x in (odd, torch.randn(2, 3, 4, 5), torch.randn(2, 5, 4, 3).permute(0, 3, 1, 2), torch.randn(0, 3, 4, 5)):
        y = channels_last(x)
        c, h, w = x.shape[1:]
        assert y.stride() == (c * h * w, 1, w * c, c) and torch.equal(y, x)
    ready = torch.randn(2, 5, 4, 3).permute(0, 3, 1, 2)
    assert channels_last(ready).data_ptr() == ready.data_ptr()  # nothing copied when the strides are right


@requires_tiny
@torch.no_grad()
def test_vae_on_channels_last_is_the_plain_layout() -> None:
    """`encode_images` / `decode_tokens` run the VAE on channels-last activations on a CPU: the latents and pictures
    are those of the plain layout up to float32 rounding, one picture or several."""
    from harmon_hf import HarmonPipeline

    model = HarmonPipeline.from_pretrained(fast_pipeline_dir()).model
    inner = model.model
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    for batch in (pixels[:1], pixels):
        plain = inner._patchify(inner.vae.encode(batch.contiguous()).latent_dist.mode() * model.config.vae_scale)
        torch.testing.assert_close(model.encode_images(batch), plain, atol=1e-4, rtol=1e-4)
        latents = (inner._unpatchify(plain) / model.config.vae_scale).contiguous()
        torch.testing.assert_close(
            model.decode_image_tokens(plain), inner.vae.decode(latents).sample, atol=1e-4, rtol=1e-4
        )


@torch.no_grad()
def test_cpu_vae_decodes_about_one_256px_picture_per_call() -> None:
    """`decode_in_slices` by default: on a CPU as many pictures per VAE call as make 256 x 256 pixels (16 of 64 px,
    one of 256 px, whatever the VAE's dtype); the slices give the pictures of one call."""
    from harmon_hf.pipeline_harmon import CPU_VAE_PIXELS_PER_CALL, decode_in_slices

    calls: list[tuple[int, ...]] = []

    class Recorder:
        config = HarmonConfig.tiny()

        def decode_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(tokens.shape[:3]))
            return tokens.permute(0, 3, 1, 2) * 2  # stands in for the VAE: per picture, no cross-picture op

    assert CPU_VAE_PIXELS_PER_CALL == 256 * 256 and Recorder.config.image_stride == 16
    for shape, expected in (
        ((3, 4, 4), [(3, 4, 4)]),
        ((20, 4, 4), [(16, 4, 4), (4, 4, 4)]),
        ((2, 16, 16), [(1, 16, 16)] * 2),
        ((2, 32, 16), [(1, 32, 16)] * 2),
        ((5, 8, 8), [(4, 8, 8), (1, 8, 8)]),
    ):
        calls.clear()
        tokens = torch.randn(*shape, 2)
        out = decode_in_slices(Recorder(), tokens)
        assert calls == expected and torch.equal(out, tokens.permute(0, 3, 1, 2) * 2)
        calls.clear()
        decode_in_slices(Recorder(), tokens, 2)
        assert [c[0] for c in calls] == [2] * (shape[0] // 2) + [1] * (shape[0] % 2)


@torch.no_grad()
def test_modulations_compute_silu_once() -> None:
    """`modulations` applies the shared SiLU(y) once for all adaLN layers: bitwise each layer's own
    `adaLN_modulation(y)`, with one SiLU call instead of one per layer."""
    head = random_head(blocks=3)
    y = torch.randn(5, 7, 64)
    expected = [block.modulation(y) for block in head.res_blocks] + [head.final_layer.modulation(y)]
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(type(module).__name__)
    )
    try:
        got = head.modulations(y)
    finally:
        hook.remove()
    assert "SiLU" not in calls  # the layers' SiLU modules are not run; F.silu once instead
    assert calls.count("Linear") == 4
    for mine, theirs in zip(got, expected, strict=True):
        assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs))
