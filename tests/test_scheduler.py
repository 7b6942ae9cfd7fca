"""HarmonDDPMScheduler and sample_tokens against the upstream fixture (items 4.6 and 4.8) plus behaviour checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from fixture_utils import FIXTURE_DIR, assert_fixture_close, fixture_json, load_tensors, requires_fixture

from harmon_hf.configuration_harmon import HarmonDiffusionHeadConfig
from harmon_hf.modeling_diffusion_head import HarmonDiffusionHead
from harmon_hf.scheduling_harmon import (
    HarmonDDPMScheduler,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    sample_tokens,
)

HEAD_FILE = "diffusion_head.safetensors"
LOSS_FILE = "loss_text2image.safetensors"
HEAD_PREFIX = "mar.diffloss.net."


@pytest.fixture(scope="module")
def head() -> HarmonDiffusionHead:
    net = HarmonDiffusionHead(
        HarmonDiffusionHeadConfig(in_channels=16, model_channels=64, num_res_blocks=2, cond_channels=32)
    )
    state = torch.load(FIXTURE_DIR / "harmon.pth", map_location="cpu", weights_only=True)
    net.load_state_dict({k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)})
    return net.eval()


@pytest.fixture(scope="module")
def random_head() -> HarmonDiffusionHead:
    """The fixture head's shape with random weights: for tests that need no upstream numbers."""
    torch.manual_seed(0)
    return HarmonDiffusionHead(
        HarmonDiffusionHeadConfig(in_channels=16, model_channels=64, num_res_blocks=2, cond_channels=32)
    ).eval()


@pytest.fixture()
def scheduler() -> HarmonDDPMScheduler:
    sched = HarmonDDPMScheduler()
    sched.set_timesteps()  # config default: 100 steps
    return sched


class GaussianHead(torch.nn.Module):
    """The exact eps predictor when x_0 ~ N(mu, s^2 I), with mu = cond (rows): eps = sqrt(1-a) / (a s^2 + 1 - a) *
    (x_t - sqrt(a) mu). Purely elementwise, so results do not depend on the batch composition. Its variance value
    `v` is constant. The probability-flow ODE maps x_T to `mu + s * z` with z = the standardised x_T."""

    def __init__(self, alphas_cumprod: torch.Tensor, s: float, v: float = 1.0):
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.float())
        self.s, self.v = s, v
        self.config = HarmonDiffusionHeadConfig(in_channels=16, model_channels=8, num_res_blocks=1, cond_channels=16)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].reshape(-1, 1)
        eps = (1 - a).sqrt() / (a * self.s**2 + 1 - a) * (x - a.sqrt() * cond)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, cond)
        cond_eps, uncond_eps = out[:, :16].chunk(2)
        guided = uncond_eps + scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), out[:, 16:]], dim=1)


# ----- schedules (4.8) ------------------------------------------------------------------------------------------
@requires_fixture
def test_schedule_tables(scheduler: HarmonDDPMScheduler) -> None:
    ours = {
        "train_betas": scheduler.train_tables.betas,
        "train_alphas_cumprod": scheduler.train_tables.alphas_cumprod,
        "sample_timestep_map": scheduler.timestep_map,
        "sample_betas": scheduler.sample_tables.betas,
        "sample_alphas_cumprod": scheduler.sample_tables.alphas_cumprod,
        "sample_posterior_log_variance_clipped": scheduler.sample_tables.posterior_log_variance_clipped,
    }
    exact = json.loads((FIXTURE_DIR / "diffusion_schedule.json").read_text())
    for key, value in ours.items():
        assert_fixture_close(value.float() if value.is_floating_point() else value, HEAD_FILE, key)
        # float64 tables: computed as upstream does, so bitwise equal to its numpy values
        torch.testing.assert_close(value, torch.tensor(exact[key], dtype=value.dtype), atol=0, rtol=1e-14)


def test_linspace_timesteps_are_upstream_respacing(scheduler: HarmonDDPMScheduler) -> None:
    assert scheduler.timesteps.tolist() == [round(i * 999 / 99) for i in range(100)][::-1]
    assert scheduler.timestep_map.tolist() == [round(i * 999 / 99) for i in range(100)]


def test_cosine_betas_formula() -> None:
    betas = cosine_betas(1000)

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    assert betas.dtype == torch.float64 and betas.max().item() == 0.999
    assert betas[10].item() == 1 - f(11 / 1000) / f(10 / 1000)


# ----- single steps (4.8 pstep_*) -----------------------------------------------------------------------------
@requires_fixture
@pytest.mark.parametrize("tag", ["pstep_cfg1", "pstep_cfg4"])
def test_single_steps(head: HarmonDiffusionHead, scheduler: HarmonDDPMScheduler, tag: str) -> None:
    data = load_tensors(HEAD_FILE)
    info = fixture_json()["diffusion_head"]["single_step"]
    cfg, temperature = info["cfg"][tag], info["temperature"]
    cond = data["cond_z"]
    got: dict[str, list[torch.Tensor]] = {k: [] for k in ("model_output", "mean", "log_variance", "pred_xstart")}
    got["sample_temp0.7"] = []
    with torch.no_grad():
        for k, index in enumerate(data[f"{tag}_t_index"].tolist()):
            t = int(scheduler.timestep_map[index])  # the network and `step` get the ORIGINAL timestep
            x, noise = data[f"{tag}_x"][k], data[f"{tag}_noise"][k]
            t_rows = torch.full((x.shape[0],), t)
            out = head.forward_with_cfg(x, t_rows, cond, cfg) if cfg != 1 else head(x, t_rows, cond)
            mean, log_var, x0 = scheduler.p_mean_variance(out, t, x)
            prev = scheduler.step(out, t, x, temperature=temperature, variance_noise=noise)
            torch.testing.assert_close(prev.pred_original_sample, x0, atol=0, rtol=0)
            for key, value in zip(got, (out, mean, log_var, x0, prev.prev_sample)):
                got[key].append(value)

            # the scheduler alone, fed upstream's own network output: agrees to float32 rounding
            ref_out = data[f"{tag}_model_output"][k]
            mean, log_var, x0 = scheduler.p_mean_variance(ref_out, t, x)
            prev = scheduler.step(ref_out, t, x, temperature=temperature, variance_noise=noise).prev_sample
            for key, value in zip(("mean", "log_variance", "pred_xstart", "sample_temp0.7"), (mean, log_var, x0, prev)):
                torch.testing.assert_close(value, data[f"{tag}_{key}"][k], atol=1e-6, rtol=1e-6)
    for key, values in got.items():
        assert_fixture_close(torch.stack(values), HEAD_FILE, f"{tag}_{key}")


# ----- full DiffLoss.sample runs (4.8) ------------------------------------------------------------------------
@requires_fixture
@pytest.mark.parametrize("run", ["cfg1_temp0", "cfg4_temp0", "cfg4_temp1"])
def test_sample_runs(head: HarmonDiffusionHead, run: str) -> None:
    data = load_tensors(HEAD_FILE)
    info = fixture_json()["diffusion_head"]["runs"][run]
    scheduler = HarmonDDPMScheduler()  # sample_tokens calls set_timesteps itself
    with torch.no_grad():
        sample, trajectory = sample_tokens(
            head,
            data["cond_z"],
            scheduler,
            guidance_scale=info["cfg"],
            temperature=info["temperature"],
            init_noise=data[f"{run}_init_noise"],
            step_noise=data.get(f"{run}_step_noise"),
            return_trajectory=True,
        )
    assert_fixture_close(sample, HEAD_FILE, f"{run}_sample")
    assert_fixture_close(trajectory, HEAD_FILE, f"{run}_trajectory")
    assert torch.equal(trajectory[-1], sample)


@requires_fixture
def test_step_noise_callable_equals_tensor(head: HarmonDiffusionHead) -> None:
    data = load_tensors(HEAD_FILE)
    noise = data["cfg4_temp1_step_noise"]
    calls: list[int] = []

    def from_callable(j: int) -> torch.Tensor:
        calls.append(j)
        return noise[j]

    kwargs = dict(guidance_scale=4.0, temperature=1.0, init_noise=data["cfg4_temp1_init_noise"])
    with torch.no_grad():
        a = sample_tokens(head, data["cond_z"], HarmonDDPMScheduler(), step_noise=noise, **kwargs)
        b = sample_tokens(head, data["cond_z"], HarmonDDPMScheduler(), step_noise=from_callable, **kwargs)
    assert torch.equal(a, b)
    assert calls == list(range(99))  # consumption order; the last step (respaced t=0) adds no noise


# ----- training loss (4.6) ------------------------------------------------------------------------------------
@requires_fixture
def test_training_loss_terms(head: HarmonDiffusionHead) -> None:
    data = load_tensors(LOSS_FILE)
    scheduler = HarmonDDPMScheduler()
    x_t = scheduler.add_noise(data["diffusion_target"], data["noise"], data["t"])
    assert_fixture_close(x_t, LOSS_FILE, "x_t")
    with torch.no_grad():
        out = head(data["x_t"], data["t"], data["diffusion_cond"])
    mse, vb = scheduler.training_loss_terms(out, data["diffusion_target"], data["x_t"], data["t"], data["noise"])
    assert_fixture_close(mse, LOSS_FILE, "loss_mse")
    assert_fixture_close(vb, LOSS_FILE, "loss_vb")
    assert_fixture_close(mse + vb, LOSS_FILE, "loss_terms")
    mask = data["diffusion_mask"]
    assert_fixture_close(((mse + vb) * mask).sum().reshape(1) / mask.sum(), LOSS_FILE, "loss")


def test_vb_trains_only_the_variance() -> None:
    scheduler = HarmonDDPMScheduler()
    torch.manual_seed(0)
    x0, noise = torch.randn(8, 16).clamp(-1, 1), torch.randn(8, 16)
    t = torch.tensor([0, 1, 5, 100, 400, 700, 998, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    out = torch.cat([torch.randn(8, 16), torch.rand(8, 16) * 2 - 1], dim=1).requires_grad_()
    mse, vb = scheduler.training_loss_terms(out, x0, x_t, t, noise)
    (grad_vb,) = torch.autograd.grad(vb.sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(mse.sum(), out)
    assert grad_vb[:, :16].abs().max() == 0 and grad_vb[:, 16:].abs().max() > 0
    assert grad_mse[:, 16:].abs().max() == 0


def test_vb_vanishes_for_the_true_posterior() -> None:
    """eps = the true noise and v = -1 (log variance = the posterior's) make p equal q: KL = 0 for t > 0."""
    scheduler = HarmonDDPMScheduler()
    torch.manual_seed(0)
    x0, noise = torch.rand(6, 16) * 1.8 - 0.9, torch.randn(6, 16)
    t = torch.tensor([1, 2, 50, 300, 600, 900])
    x_t = scheduler.add_noise(x0.double(), noise.double(), t)
    out = torch.cat([noise.double(), -torch.ones(6, 16, dtype=torch.float64)], dim=1)
    mse, vb = scheduler.training_loss_terms(out, x0.double(), x_t, t, noise.double())
    assert mse.abs().max() == 0
    assert vb.abs().max() < 1e-6


def test_vb_at_t0_is_the_decoder_nll() -> None:
    """At t = 0 the VB term is the discretised-Gaussian NLL of x_0 (bits); compare with the exact normal CDF."""
    scheduler = HarmonDDPMScheduler()
    torch.manual_seed(0)
    x0 = torch.rand(4, 16, dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn(4, 16, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.long)
    x_t = scheduler.add_noise(x0, noise, t)
    out = torch.cat([noise, torch.rand(4, 16, dtype=torch.float64) * 2 - 1], dim=1)
    _, vb = scheduler.training_loss_terms(out, x0, x_t, t, noise)
    mean, log_var, _ = scheduler._p_mean_variance(out, x_t, t, scheduler.train_tables, clip=False)
    std = torch.exp(0.5 * log_var)
    prob = torch.special.ndtr((x0 - mean + 1 / 255) / std) - torch.special.ndtr((x0 - mean - 1 / 255) / std)
    exact_bits = -(prob.log() / math.log(2)).mean(dim=1)
    torch.testing.assert_close(vb, exact_bits, rtol=1e-2, atol=1e-3)  # upstream uses a tanh approximation of the CDF
    # the top bin extends to +infinity: P(x = 1 | mean 2, std 1) = 1 - cdf(-1 - 1/255) = 0.843
    edge = discretized_gaussian_log_likelihood(torch.ones(1), torch.full((1,), 2.0), torch.zeros(1))
    torch.testing.assert_close(edge.exp(), 1 - torch.special.ndtr(torch.tensor([-1 - 1 / 255])), atol=1e-3, rtol=0)


@requires_fixture
def test_add_noise_formula() -> None:
    scheduler = HarmonDDPMScheduler()
    x0, noise = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 998, 999])
    abar = torch.tensor(
        json.loads((FIXTURE_DIR / "diffusion_schedule.json").read_text())["train_alphas_cumprod"], dtype=torch.float64
    )
    expected = abar[t, None].sqrt() * x0 + (1 - abar[t, None]).sqrt() * noise
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), expected, atol=1e-12, rtol=1e-12)
    assert scheduler.add_noise(x0.float(), noise.float(), t).dtype == torch.float32


# ----- the scheduler's own behaviour --------------------------------------------------------------------------
def test_learned_range_endpoints(scheduler: HarmonDDPMScheduler) -> None:
    x = torch.randn(2, 16)
    t = int(scheduler.timesteps[10])
    index = scheduler.respaced_index(t)
    for value, table in ((1.0, "log_betas"), (-1.0, "posterior_log_variance_clipped")):
        out = torch.cat([torch.randn(2, 16), torch.full((2, 16), value)], dim=1)
        _, log_var, _ = scheduler.p_mean_variance(out, t, x)
        expected = getattr(scheduler.sample_tables, table)[index].float()
        torch.testing.assert_close(log_var, expected.expand(2, 16), atol=1e-6, rtol=0)


def test_step_generator_and_last_step(scheduler: HarmonDDPMScheduler) -> None:
    out, x = torch.randn(3, 32), torch.randn(3, 16)
    t = int(scheduler.timesteps[0])
    a = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    b = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    c = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(8)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean, _, _ = scheduler.p_mean_variance(out, t, x)
    assert torch.equal(scheduler.step(out, t, x, temperature=0.0).prev_sample, mean)
    # the last respaced step (original t = 0) adds no noise
    mean0, _, _ = scheduler.p_mean_variance(out, 0, x)
    assert torch.equal(scheduler.step(out, 0, x, generator=torch.Generator().manual_seed(7)).prev_sample, mean0)
    # per-row timesteps give the rows' scalar results
    rows = torch.tensor([t, 0, int(scheduler.timesteps[50])])
    noise = torch.randn(3, 16)
    per_row = scheduler.step(out, rows, x, variance_noise=noise).prev_sample
    for i, ti in enumerate(rows.tolist()):
        one = scheduler.step(out[i : i + 1], ti, x[i : i + 1], variance_noise=noise[i : i + 1]).prev_sample
        torch.testing.assert_close(per_row[i : i + 1], one, atol=0, rtol=0)


def test_save_load_round_trip(tmp_path) -> None:
    sched = HarmonDDPMScheduler(num_inference_steps=50)
    sched.save_pretrained(tmp_path)
    loaded = HarmonDDPMScheduler.from_pretrained(tmp_path)
    public = {k: v for k, v in sched.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    assert loaded.config.num_inference_steps == 50
    loaded.set_timesteps()
    assert len(loaded.timesteps) == 50
    assert torch.equal(loaded.train_tables.alphas_cumprod, sched.train_tables.alphas_cumprod)
    # a stock scheduler can read the folder (the extra field is ignored): the component stays swappable
    assert DDIMScheduler.from_pretrained(tmp_path).config.beta_schedule == "squaredcos_cap_v2"


def test_bad_arguments_raise(scheduler: HarmonDDPMScheduler, random_head: HarmonDiffusionHead) -> None:
    head = random_head  # argument checks only: runs without the upstream fixture
    with pytest.raises(ValueError, match="bogus"):
        HarmonDDPMScheduler(variance_type="bogus")
    with pytest.raises(ValueError, match="0"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="1001"):
        scheduler.set_timesteps(1001)
    with pytest.raises(ValueError, match="998"):
        scheduler.step(torch.zeros(2, 32), 998, torch.zeros(2, 16))  # not one of the 100 kept timesteps
    with pytest.raises(ValueError, match="-0.5"):
        scheduler.step(torch.zeros(2, 32), 999, torch.zeros(2, 16), temperature=-0.5)
    with pytest.raises(ValueError, match="16"):
        scheduler.step(torch.zeros(2, 16), 999, torch.zeros(2, 16))  # learned range needs 2C channels
    with pytest.raises(ValueError, match="1000"):
        scheduler.add_noise(torch.zeros(1, 16), torch.zeros(1, 16), torch.tensor([1000]))
    cond = torch.zeros(5, 32)
    with pytest.raises(ValueError, match="N=5"):
        sample_tokens(head, cond, scheduler, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"\(5, 16\)"):
        sample_tokens(head, cond, scheduler, init_noise=torch.zeros(4, 16))
    with pytest.raises(ValueError, match="2 generators for 5"):
        sample_tokens(head, cond, scheduler, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match=r"\(100, 5, 16\)"):
        sample_tokens(head, cond, scheduler, step_noise=torch.zeros(99, 5, 16))
    dpm = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    with pytest.raises(ValueError, match="learned_range"):  # it would keep model_output[:, :3] (RGB)
        sample_tokens(head, cond, dpm, num_inference_steps=10)
    with pytest.raises(ValueError, match="DDPMScheduler"):
        sample_tokens(head, cond, DDPMScheduler.from_config(scheduler.config))
    with pytest.raises(ValueError, match="DDPMScheduler"):
        scheduler.compatible_scheduler("DDPMScheduler")


# ----- sample_tokens behaviour --------------------------------------------------------------------------------
@requires_fixture
def test_sample_tokens_determinism(head: HarmonDiffusionHead) -> None:
    cond = load_tensors(HEAD_FILE)["cond_z"]
    with torch.no_grad():
        runs = [
            sample_tokens(
                head, cond, HarmonDDPMScheduler(), guidance_scale=4.0, generator=torch.Generator().manual_seed(s)
            )
            for s in (0, 0, 1)
        ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_generator_list_batch_equals_rows_one_by_one(cfg: float) -> None:
    scheduler = HarmonDDPMScheduler()
    head = GaussianHead(scheduler.train_tables.alphas_cumprod, s=0.3, v=0.2)
    torch.manual_seed(0)
    n = 3
    cond = torch.randn(2 * n if cfg != 1 else n, 16) * 0.5

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = sample_tokens(head, cond, scheduler, 20, guidance_scale=cfg, temperature=0.9, generator=gens(range(n)))
    for i in range(n):
        rows = [i, n + i] if cfg != 1 else [i]
        alone = sample_tokens(head, cond[rows], scheduler, 20, guidance_scale=cfg, temperature=0.9, generator=gens([i]))
        assert torch.equal(batch[rows], alone)


def test_fast_schedulers_solve_the_probability_flow_ode() -> None:
    """With the exact eps of Gaussian data N(mu, s^2), DDIM / DPM-Solver (deterministic ODE solvers fed the eps half)
    must land on the ODE's known solution mu + s * z; DPM-Solver in 20 steps."""
    harmon = HarmonDDPMScheduler()
    s = 0.3
    head = GaussianHead(harmon.train_tables.alphas_cumprod, s=s)
    torch.manual_seed(0)
    z = torch.randn(256, 16)
    mu = torch.linspace(-0.5, 0.5, 16).expand(256, 16)
    a_T = harmon.train_tables.alphas_cumprod[-1].item()
    exact = mu + s * (z - a_T**0.5 * mu) / (a_T * s**2 + 1 - a_T) ** 0.5
    dpm = harmon.compatible_scheduler(DPMSolverMultistepScheduler)
    ddim = harmon.compatible_scheduler("DDIMScheduler")
    assert dpm.config.variance_type is None and not dpm.config.thresholding
    x_dpm = sample_tokens(head, mu, dpm, 20, init_noise=z, temperature=0.7)  # temperature: no effect on an ODE
    x_ddim = sample_tokens(head, mu, ddim, 100, init_noise=z)
    assert (x_dpm - exact).abs().max() < 0.1  # measured 0.04
    assert (x_ddim - exact).abs().max() < 0.05  # measured 0.016
    assert torch.equal(x_dpm, sample_tokens(head, mu, dpm, 20, init_noise=z))  # stateful solver reset per call


def test_ddpm_sampler_matches_gaussian_moments() -> None:
    """The stochastic 100-step sampler on exact eps draws from N(mu, s^2) (moments within sampling error)."""
    scheduler = HarmonDDPMScheduler()
    s = 0.3
    head = GaussianHead(scheduler.train_tables.alphas_cumprod, s=s, v=1.0)
    mu = torch.linspace(-0.5, 0.5, 16).expand(2048, 16)
    x = sample_tokens(head, mu, scheduler, generator=torch.Generator().manual_seed(0))
    assert (x.mean(0) - mu[0]).abs().max() < 0.03  # standard error 0.0066
    assert (x.std(0) - s).abs().max() < 0.03  # standard error 0.0047
    cold = sample_tokens(head, mu, scheduler, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert cold.std(0).max() < x.std(0).min()


def test_fast_scheduler_keeps_the_x0_clipping() -> None:
    """A folder that clips x_0 (the shipped model: range 5) must clip under DDIM too: with a head whose eps is far off
    (x_0 predictions of about +-40), the unclipped DDIM lands far outside the range, the clipped one inside it."""
    harmon = HarmonDDPMScheduler(clip_sample=True, clip_sample_range=5.0)
    head = GaussianHead(harmon.train_tables.alphas_cumprod, s=0.3)
    mu = torch.full((64, 16), 40.0)  # the data mean the head believes in
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    ddim = harmon.compatible_scheduler("DDIMScheduler")
    assert ddim.config.clip_sample and ddim.config.clip_sample_range == 5.0
    clipped = sample_tokens(head, mu, ddim, 20, init_noise=z)
    unclipped = sample_tokens(
        head, mu, harmon.compatible_scheduler("DDIMScheduler", clip_sample=False), 20, init_noise=z
    )
    assert clipped.abs().max() <= 5.0 + 1e-4
    assert unclipped.abs().max() > 30.0
