"""The diffusion-head scheduler of Harmon and the per-token sampling loop (upstream `DiffLoss.sample`).

Upstream (MAR's copy of the IDDPM/DiT `gaussian_diffusion`) keeps every schedule table in float64 and turns the
coefficient it needs into float32 right before multiplying with the float32 tensors. Stock `DDPMScheduler` has the
same math but float32 tables (relative error up to 1.3e-5 in `alphas_cumprod`), no temperature and no injected
per-step noise, hence `HarmonDDPMScheduler`. It also carries the training loss terms (MSE + variational bound) of
the 1000-step process because they share the tables.

Two processes live in one scheduler:

- the training process over all `num_train_timesteps` steps (`train_tables`), used by `add_noise` and
  `training_loss_terms`; timesteps are original ones (0..T-1);
- the respaced sampling process over the timesteps chosen by `set_timesteps` (`sample_tables`, `timestep_map`): its
  betas are recomputed from `alphas_cumprod` at the kept steps, `step` takes the ORIGINAL timestep value (as every
  diffusers scheduler) and looks up its respaced index.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput, rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers resolves the base class here)
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

logger = logging.get_logger(__name__)

_LOG2 = math.log(2.0)
_SUPPORTED_VARIANCE_TYPES = (
    "learned_range",
    "learned",
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
)
_SUPPORTED_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule (`squaredcos_cap_v2`) in float64: `min(1 - f((i+1)/T) / f(i/T), max_beta)` with
    `f(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2`. Computed with Python floats (as upstream's numpy loop) so the
    values are bitwise those of upstream. Returns `(T,)` float64."""

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(eq=False)
class DiffusionTables:
    """Float64 tables of one Gaussian diffusion process of `K` steps (all fields `(K,)` float64, CPU).

    Built like upstream's `GaussianDiffusion.__init__` from the betas of the (possibly respaced) process.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    log_betas: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    fixed_large_log_variance: torch.Tensor
    # per (device, dtype): all tables stacked `(num_fields, K)`, so a step gathers coefficients without host syncs
    _stacked: dict = field(default_factory=dict, repr=False, compare=False)
    # per (device, dtype, name, int index): the 0-d coefficient, so a sampling step does no table indexing
    _scalars: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> DiffusionTables:
        betas = betas.to(torch.float64).cpu()
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # the posterior variance is 0 at the first step: upstream replaces its log by the second entry's
        post_var_head = post_var[1:2] if len(betas) > 1 else betas[:1]
        large_var_head = post_var[1:2] if len(betas) > 1 else betas[:1]
        return cls(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=abar.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - abar).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / abar).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / abar - 1.0).sqrt(),
            log_betas=betas.log(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=torch.cat([post_var_head, post_var[1:]]).log(),
            posterior_mean_coef1=betas * abar_prev.sqrt() / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            fixed_large_log_variance=torch.cat([large_var_head, betas[1:]]).log(),
        )

    @classmethod
    def respaced(cls, alphas_cumprod: torch.Tensor, kept: torch.Tensor) -> DiffusionTables:
        """The process keeping only the ascending original timesteps `kept` of a process with `alphas_cumprod`
        `(T,)`: `beta_i = 1 - abar[k_i] / abar[k_(i-1)]` with `abar[k_(-1)] = 1`."""
        abar = alphas_cumprod.to(torch.float64).cpu()[kept.cpu()]
        return cls.from_betas(1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))

    def __len__(self) -> int:
        return len(self.betas)

    def take(self, names: tuple[str, ...], index: int | torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
        """The coefficients `names` at `index`, cast to `like.dtype` (float64 -> float32 as upstream does) and on
        `like.device`, shaped to broadcast against `like` `(N, ...)`: 0-d for an int index, `(N, 1, ..., 1)` for a
        per-row `(N,)` index."""
        key = (like.device, like.dtype)
        if isinstance(index, int):
            found = [self._scalars.get((key, name, index)) for name in names]
            if all(c is not None for c in found):
                return found
        stacked = self._stacked.get(key)
        if stacked is None:
            # cast on the CPU first: some backends (MPS) have no float64
            stacked = torch.stack([getattr(self, n) for n in _TABLE_FIELDS]).to(like.dtype).to(like.device)
            self._stacked[key] = stacked
        out = []
        for name in names:
            coef = stacked[_TABLE_INDEX[name]][index]
            if coef.ndim:
                coef = coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))
            elif isinstance(index, int):
                self._scalars[(key, name, index)] = coef
            out.append(coef)
        return out


_TABLE_FIELDS = tuple(f.name for f in fields(DiffusionTables) if not f.name.startswith("_"))
_TABLE_INDEX = {name: i for i, name in enumerate(_TABLE_FIELDS)}


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: `(N, ...)` -> `(N,)`."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation upstream uses (kept for parity; |error| < 3e-4)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of `x` in [-1, 1] under a Gaussian discretised into 255 bins of width 2/255;
    the outermost bins extend to +-infinity."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class HarmonDDPMScheduler(DDPMScheduler):
    r"""
    `DDPMScheduler` with upstream Harmon's numerics: float64 schedule tables, learned-range variance, a sampling
    `temperature` and injectable per-step noise; plus `add_noise` / `training_loss_terms` of the training process.

    Args (on top of `DDPMScheduler`'s, whose defaults are changed to Harmon's):
        num_train_timesteps (`int`, defaults to 1000), beta_schedule (`str`, defaults to `"squaredcos_cap_v2"`),
        variance_type (`str`, defaults to `"learned_range"`), clip_sample (`bool`, defaults to `False`),
        prediction_type (`str`, defaults to `"epsilon"`), timestep_spacing (`str`, defaults to `"linspace"`:
        with 100 steps the kept timesteps are round(i * 999 / 99), upstream's respacing).
        num_inference_steps (`int`, defaults to 100): used by `set_timesteps()` when it gets no count.

    Attributes:
        train_tables (`DiffusionTables`): the float64 tables of the `num_train_timesteps`-step process.
        sample_tables (`DiffusionTables`): the float64 tables of the respaced process of the current `timesteps`.
        timestep_map (`torch.LongTensor`): `(K,)` ascending original timesteps kept (respaced index -> timestep).

    Before `set_timesteps` is called the sampling process is the full one (every timestep kept).
    `step(model_output (N, 2C), timestep, sample (N, C))`: `timestep` is an ORIGINAL timestep from `timesteps`
    (an int, a 0-d tensor, or an `(N,)` tensor of per-row timesteps).
    """

    _compatibles = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "squaredcos_cap_v2",
        trained_betas: list[float] | None = None,
        variance_type: str = "learned_range",
        clip_sample: bool = False,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        num_inference_steps: int = 100,
    ):
        if variance_type not in _SUPPORTED_VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {_SUPPORTED_VARIANCE_TYPES}, got {variance_type!r}")
        if prediction_type not in _SUPPORTED_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_SUPPORTED_PREDICTION_TYPES}, got {prediction_type!r}")
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be an int in [1, {num_train_timesteps}], got {num_inference_steps!r}"
            )
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        base_betas = self._float64_betas()
        # Upstream's training process is itself a "respacing" that keeps every step (create_diffusion with
        # timestep_respacing=""), so its betas are recomputed from alphas_cumprod like the sampler's.
        self._base_alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)
        self.train_tables = DiffusionTables.respaced(self._base_alphas_cumprod, torch.arange(num_train_timesteps))
        # the inherited float32 tables (get_velocity, previous_timestep users) become float32 copies of these
        self.betas = self.train_tables.betas.float()
        self.alphas = (1.0 - self.train_tables.betas).float()
        self.alphas_cumprod = self.train_tables.alphas_cumprod.float()
        self._build_sample_tables()
        # diffusers records which arguments were left at their defaults, and `OtherScheduler.from_config(config)`
        # then takes the OTHER class's defaults for them (e.g. DDIM's linear betas instead of our cosine ones).
        # Our defaults are Harmon's process, not generic ones: every value counts as given.
        self.register_to_config(_use_default_values=[])

    def _float64_betas(self) -> torch.Tensor:
        """`(T,)` float64 betas of the configured schedule (the float32 diffusers ones only for exotic schedules)."""
        cfg = self.config
        if cfg.trained_betas is not None:
            betas = torch.tensor(cfg.trained_betas, dtype=torch.float64)
        elif cfg.beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(cfg.num_train_timesteps)
        elif cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
        elif cfg.beta_schedule == "scaled_linear":
            start, end = cfg.beta_start**0.5, cfg.beta_end**0.5
            betas = torch.linspace(start, end, cfg.num_train_timesteps, dtype=torch.float64) ** 2
        else:
            return self.betas.double()  # already rescaled by DDPMScheduler if asked
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return betas

    # ----- respacing -------------------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the sampling timesteps (descending, original values) and build the respaced tables.

        Args:
            num_inference_steps: number of steps; `None` (and no `timesteps`) uses `config.num_inference_steps`.
            device: where `self.timesteps` goes (the float64 tables stay on the CPU).
            timesteps: custom descending original timesteps in [0, num_train_timesteps).
        """
        if num_inference_steps is None and timesteps is None:
            num_inference_steps = self.config.num_inference_steps
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= self.config.num_train_timesteps
        ):
            raise ValueError(
                f"num_inference_steps must be an int in [1, {self.config.num_train_timesteps}], "
                f"got {num_inference_steps!r}"
            )
        if timesteps is not None and len(timesteps) and min(timesteps) < 0:
            raise ValueError(f"custom timesteps must be >= 0, got {min(timesteps)}")
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
        if timesteps is not None:
            self.num_inference_steps = len(timesteps)
        self._build_sample_tables()

    def _build_sample_tables(self) -> None:
        kept = self.timesteps.detach().cpu().to(torch.int64).flip(0)
        if len(kept) == 0 or kept[0] < 0 or kept[-1] >= self.config.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.config.num_train_timesteps}), got {kept.tolist()}")
        if len(kept) > 1 and not bool((kept[1:] > kept[:-1]).all()):
            raise ValueError(f"timesteps must be strictly decreasing, got {kept.flip(0).tolist()}")
        self.timestep_map = kept
        self._timestep_index = {int(t): i for i, t in enumerate(kept.tolist())}
        self.sample_tables = DiffusionTables.respaced(self._base_alphas_cumprod, kept)

    def respaced_index(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """Original timestep(s) -> index in the respaced process (0 = the last, least noisy step).

        `timestep`: an int / 0-d tensor (returns an int) or an `(N,)` tensor (returns an `(N,)` LongTensor on its
        device). Raises `ValueError` for a timestep that is not in `self.timesteps`.
        """
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            flat = timestep.detach().cpu().to(torch.int64).reshape(-1)
            idx = torch.searchsorted(self.timestep_map, flat).clamp(max=len(self.timestep_map) - 1)
            bad = self.timestep_map[idx] != flat
            if bool(bad.any()):
                raise ValueError(
                    f"timestep {flat[bad][0].item()} is not one of this scheduler's timesteps; call set_timesteps()"
                )
            return idx.to(timestep.device)
        t = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        if t not in self._timestep_index:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps; call set_timesteps()")
        return self._timestep_index[t]

    # ----- one reverse step ------------------------------------------------------------------------------------
    def _split_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = sample.shape[1]
        if self.config.variance_type in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * c:
                raise ValueError(
                    f"variance_type={self.config.variance_type!r} needs model_output with {2 * c} channels on dim 1 "
                    f"(prediction + variance values), got shape {tuple(model_output.shape)}"
                )
            return model_output[:, :c], model_output[:, c:]
        if model_output.shape[1] not in (c, 2 * c):
            raise ValueError(f"model_output must have {c} or {2 * c} channels, got shape {tuple(model_output.shape)}")
        return model_output[:, :c], None

    def _p_mean_variance(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        index: int | torch.Tensor,
        tables: DiffusionTables,
        clip: bool,
        need_variance: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Upstream `p_mean_variance` on already float32/64 tensors: returns (mean, log_variance, pred_xstart).

        With `need_variance=False` the log variance (which does not affect the mean) is skipped and returned as None.
        """
        pred, var_values = self._split_output(model_output, sample)
        x = sample
        if self.config.prediction_type == "epsilon":
            a, b = tables.take(("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"), index, x)
            pred_x0 = a * x - b * pred
        elif self.config.prediction_type == "sample":
            pred_x0 = pred
        else:  # v_prediction
            a, b = tables.take(("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), index, x)
            pred_x0 = a * x - b * pred
        if clip:
            if self.config.thresholding:
                pred_x0 = self._threshold_sample(pred_x0)
            elif self.config.clip_sample:
                pred_x0 = pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        coef1, coef2 = tables.take(("posterior_mean_coef1", "posterior_mean_coef2"), index, x)
        mean = coef1 * pred_x0 + coef2 * x
        if not need_variance:
            return mean, None, pred_x0

        vt = self.config.variance_type
        if vt == "learned_range":
            min_log, max_log = tables.take(("posterior_log_variance_clipped", "log_betas"), index, x)
            frac = (var_values + 1) / 2  # the network's value in [-1, 1] -> interpolation weight
            log_var = frac * max_log + (1 - frac) * min_log
        elif vt == "learned":
            log_var = var_values
        else:
            name = "posterior_log_variance_clipped" if vt.startswith("fixed_small") else "fixed_large_log_variance"
            (log_var,) = tables.take((name,), index, x)
            log_var = log_var.expand_as(x)
        return mean, log_var, pred_x0

    @staticmethod
    def _compute_dtype(sample: torch.Tensor) -> torch.dtype:
        # float32 like upstream (half precision samples are promoted; float64 samples keep float64 coefficients)
        return torch.promote_types(sample.dtype, torch.float32)

    def p_mean_variance(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, log variance and predicted x_0 of p(x_{t-1} | x_t) for one respaced step (no noise).

        Args:
            model_output: `(N, 2C, ...)` network output (prediction, then variance values for learned variances) or
                `(N, C, ...)` with a fixed variance.
            timestep: original timestep (int / 0-d) or per-row `(N,)`; must be in `self.timesteps`.
            sample: `(N, C, ...)` x_t.
        Returns:
            `(mean, log_variance, pred_original_sample)`, each `(N, C, ...)` in float32 (float64 for float64 input).
        """
        dtype = self._compute_dtype(sample)
        index = self.respaced_index(timestep)
        return self._p_mean_variance(model_output.to(dtype), sample.to(dtype), index, self.sample_tables, clip=True)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        temperature: float = 1.0,
        variance_noise: torch.Tensor | None = None,
    ) -> DDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step: `prev = mean + [index > 0] * exp(0.5 * log_var) * noise * temperature`.

        Args:
            model_output: `(N, 2C, ...)` (eps and learned-range values for the default config).
            timestep: ORIGINAL timestep(s) from `self.timesteps` (int, 0-d or `(N,)`).
            sample: `(N, C, ...)` x_t.
            generator: a generator or a list of N (one per row, diffusers' `randn_tensor`) for the noise.
            temperature: multiplies the noise; 0 gives the mean (no noise is drawn then).
            variance_noise: `(N, C, ...)` noise to use instead of drawing it.
        Returns:
            `DDPMSchedulerOutput(prev_sample, pred_original_sample)` in `sample.dtype` (or the tuple).

        No noise is drawn at the last respaced step (index 0) or with temperature 0.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        dtype = self._compute_dtype(sample)
        index = self.respaced_index(timestep)
        x = sample.to(dtype)
        nonzero = (index != 0) if isinstance(index, torch.Tensor) else index != 0
        add_noise = temperature != 0 and (bool(nonzero.any()) if isinstance(nonzero, torch.Tensor) else nonzero)
        # without noise the variance is not needed (the last step, temperature 0): skip its 8 tensor operations
        mean, log_var, pred_x0 = self._p_mean_variance(
            model_output.to(dtype), x, index, self.sample_tables, True, need_variance=add_noise
        )
        if add_noise:
            if variance_noise is None:
                if isinstance(generator, list) and len(generator) != x.shape[0]:
                    raise ValueError(f"got {len(generator)} generators for {x.shape[0]} rows")
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=dtype)
            else:
                if variance_noise.shape != x.shape:
                    raise ValueError(
                        f"variance_noise must have the sample's shape {tuple(x.shape)}, "
                        f"got {tuple(variance_noise.shape)}"
                    )
                noise = variance_noise.to(x.device, dtype)
            std = torch.exp(0.5 * log_var)
            if isinstance(nonzero, torch.Tensor):
                std = nonzero.reshape(-1, *([1] * (x.ndim - 1))).to(dtype) * std
            prev = mean + std * noise * temperature
        else:
            prev = mean
        prev, pred_x0 = prev.to(sample.dtype), pred_x0.to(sample.dtype)
        if not return_dict:
            return prev, pred_x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=pred_x0)

    # ----- training process -------------------------------------------------------------------------------------
    def _check_train_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps).to(torch.int64)
        lo, hi = int(timesteps.min()), int(timesteps.max())
        if lo < 0 or hi >= self.config.num_train_timesteps:
            bad = lo if lo < 0 else hi
            raise ValueError(f"training timestep {bad} outside [0, {self.config.num_train_timesteps})")
        return timesteps

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """q(x_t | x_0) of the training process: `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`.

        Args:
            original_samples: `(N, C, ...)` x_0. noise: same shape. timesteps: `(N,)` original timesteps.
        Returns:
            `(N, C, ...)` in `original_samples.dtype` (computed with float32 coefficients from the float64 table).
        """
        timesteps = self._check_train_timesteps(timesteps).to(original_samples.device)
        dtype = self._compute_dtype(original_samples)
        x0 = original_samples.to(dtype)
        a, b = self.train_tables.take(("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), timesteps, x0)
        return (a * x0 + b * noise.to(dtype)).to(original_samples.dtype)

    def training_loss_terms(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's per-row training loss pieces of the `num_train_timesteps`-step process (MSE + VB).

        Args:
            model_output: `(N, 2C, ...)` network output on `(x_t, timesteps)` (prediction, then variance values).
            x_start: `(N, C, ...)` x_0. x_t: `(N, C, ...)` = `add_noise(x_start, noise, timesteps)`.
            timesteps: `(N,)` original timesteps. noise: `(N, C, ...)`.
        Returns:
            `(mse, vb)`, each `(N,)`: mse = mean over non-batch dims of (target - prediction)^2 (target = noise for
            eps prediction); vb = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) in bits, where p uses the learned
            variance and a mean from the DETACHED prediction (so vb trains only the variance, as in IDDPM), and at
            t == 0 the discretised Gaussian decoder NLL in bits instead.
        """
        if self.config.variance_type not in ("learned", "learned_range"):
            raise ValueError(f"training_loss_terms needs a learned variance, got {self.config.variance_type!r}")
        timesteps = self._check_train_timesteps(timesteps).to(x_t.device)
        dtype = self._compute_dtype(x_t)
        out, x0, xt, noise = (v.to(dtype) for v in (model_output, x_start, x_t, noise))
        pred, var_values = self._split_output(out, xt)
        tables = self.train_tables
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "sample":
            target = x0
        else:
            a, b = tables.take(("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), timesteps, x0)
            target = a * noise - b * x0
        mse = _mean_flat((target - pred) ** 2)

        frozen = torch.cat([pred.detach(), var_values], dim=1)
        coef1, coef2, true_log_var = tables.take(
            ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped"), timesteps, xt
        )
        true_mean = coef1 * x0 + coef2 * xt
        mean, log_var, _ = self._p_mean_variance(frozen, xt, timesteps, tables, clip=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / _LOG2
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / _LOG2
        vb = torch.where(timesteps == 0, nll, kl)
        return mse, vb

    # ----- the sampling loop's step ---------------------------------------------------------------------------
    def fused_reverse_steps(self, device: torch.device | str = "cpu") -> FusedReverseSteps | None:
        """The reverse steps of the current `timesteps` as a `FusedReverseSteps` (what `sample_tokens` runs), or None
        for a configuration it does not cover (prediction other than epsilon, variance other than learned-range,
        thresholding): `step` then does the work."""
        cfg = self.config
        if cfg.prediction_type != "epsilon" or cfg.variance_type != "learned_range" or cfg.thresholding:
            return None
        clip = cfg.clip_sample_range if cfg.clip_sample else None
        key = (tuple(self.timestep_map.tolist()), str(device), clip)
        cached = getattr(self, "_fused_steps", None)
        if cached is None or cached[0] != key:  # the loop calls set_timesteps every MAR round with the same steps
            cached = (key, FusedReverseSteps(self.sample_tables, clip, device))
            self._fused_steps = cached
        return cached[1]

    # ----- faster samplers --------------------------------------------------------------------------------------
    def compatible_scheduler(self, scheduler_class: type | str, **kwargs) -> SchedulerMixin:
        """A DDIM / DPM-Solver (any class in `_compatibles`) on the same training schedule, set up to be fed the eps
        half of the head's output (`variance_type=None`, no thresholding; this scheduler's x_0 clipping is carried
        over where the class has `clip_sample`, i.e. DDIM; DPM-Solver has no plain clipping). `kwargs` override the
        rest.

        (`DPMSolverMultistepScheduler.from_config(self.config)` would inherit `variance_type="learned_range"`, for
        which it keeps `model_output[:, :3]`: wrong for 16-channel tokens.)
        """
        import diffusers

        cls = getattr(diffusers, scheduler_class) if isinstance(scheduler_class, str) else scheduler_class
        if issubclass(cls, DDPMScheduler):
            raise ValueError(
                f"{cls.__name__}: the DDPM sampler is this scheduler itself (it adds temperature and noise)"
            )
        cfg = self.config
        base = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            beta_schedule=cfg.beta_schedule,
            trained_betas=cfg.trained_betas,
            prediction_type=cfg.prediction_type,
            timestep_spacing=cfg.timestep_spacing,
            steps_offset=cfg.steps_offset,
            rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
            variance_type=None,
            clip_sample=cfg.clip_sample,
            clip_sample_range=cfg.clip_sample_range,
            thresholding=False,
        )
        params = inspect.signature(cls.__init__).parameters
        base = {k: v for k, v in base.items() if k in params}
        base.update(kwargs)
        return cls(**base)


class FusedReverseSteps:
    """`HarmonDDPMScheduler.step` for a sampling loop: the eps -> x_0 -> posterior mean -> learned-range noise
    update of every respaced step in 4-8 tensor operations, from coefficients precomputed once.

    `step` costs about 40 tensor operations plus lookups and checks, per step; a token sampler runs it 100 times per
    MAR round on a few rows, where that overhead is the time. Here the float64 tables are rounded to float32 once
    (as upstream rounds each coefficient before use) into 0-d tensors, and the multiply-adds are fused:
    `x_0 = a x - b eps`, `mean = c1 x_0 + c2 x`, `std = exp(k0 + k1 v)` (the learned-range interpolation
    `0.5 (f max + (1 - f) min)` with `f = (v + 1) / 2`, rearranged), `prev = mean + temperature * std * noise`.
    The values are `step`'s up to float32 rounding (measured in `tests/test_performance_invariants.py`).

    Call with `j`, the reverse step's position in `timesteps` (0 = the noisiest).
    """

    def __init__(self, tables: DiffusionTables, clip_range: float | None, device: torch.device | str = "cpu"):
        names = (
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
            "posterior_log_variance_clipped",
            "log_betas",
        )
        # float64 -> float32 (upstream's rounding), as 0-d tensors (a tensor op with a 0-d tensor operand costs less
        # than with a Python float); k0, k1 from the rounded tables. Reverse-step order: step j is index K - 1 - j.
        table = torch.stack([getattr(tables, name) for name in names]).float().double().flip(1)
        a, b, c1, c2, min_log, max_log = table
        k0, k1 = (max_log + min_log) / 4, (max_log - min_log) / 4
        coefficients = torch.stack([a, -b, c1, c2, k0, k1], dim=1).to(device=device, dtype=torch.float32)
        self.coefficients = [row.unbind(0) for row in coefficients.unbind(0)]
        self.clip_range = clip_range
        self.num_steps = len(tables)

    def __call__(
        self,
        j: int,
        eps: torch.Tensor,
        var_values: torch.Tensor,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """x_{t-1} `(N, C)` from `eps`, `var_values` (the head's learned-range values) and `sample` x_t, all `(N, C)`
        float32; `noise` `(N, C)` is added (times `temperature`) unless None. The last step (j = K - 1) adds no
        noise in upstream's sampler: pass None there."""
        a, minus_b, c1, c2, k0, k1 = self.coefficients[j]
        x0 = torch.addcmul(sample * a, eps, minus_b)
        if self.clip_range is not None:
            x0.clamp_(-self.clip_range, self.clip_range)
        mean = torch.addcmul(x0.mul_(c1), sample, c2)
        if noise is None or temperature == 0:
            return mean
        std = torch.addcmul(k0, var_values, k1).exp_()
        return mean.addcmul_(std, noise, value=temperature)


# ----- the sampling loop -----------------------------------------------------------------------------------------
# Upper bound of the adaLN modulations precomputed at once by `sample_tokens` (they are computed for chunks of steps).
MODULATION_CHUNK_BYTES = 64 * 2**20
# Rows of one batched adaLN product that `sample_tokens` aims for, per channel of the head's width (see
# `modulation_chunk_steps`).
MODULATION_ROWS_PER_CHANNEL = 4
_warned_ignored_temperature: set[str] = set()


def modulation_chunk_steps(rows: int, width: int, bytes_per_step: int, num_steps: int) -> int:
    """How many steps' adaLN modulations `sample_tokens` computes in one batched product per layer.

    Enough steps that the product has about `MODULATION_ROWS_PER_CHANNEL * width` rows (a few steps of a large
    batch, many steps of a small one; a wide head wants taller products), but no more: the chunk's modulations are
    written to memory and read back step by step, and beyond a few MB a narrow head at many rows is bound by that
    traffic (the small benchmark head, width 256, at 256 rows in bfloat16: 1.5 ms per step with 4 steps per chunk,
    2.0 ms with 46). At most `MODULATION_CHUNK_BYTES` of modulations and `num_steps` steps, at least one step.
    """
    wanted = -(-MODULATION_ROWS_PER_CHANNEL * width // max(rows, 1))  # ceil
    return max(1, min(num_steps, wanted, MODULATION_CHUNK_BYTES // max(bytes_per_step, 1)))


def _is_stochastic(scheduler: SchedulerMixin) -> bool:
    """Whether a non-Harmon scheduler's `step` consumes noise (fed through `variance_noise`)."""
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    return isinstance(algorithm, str) and algorithm.startswith("sde-")


def _draw(
    shape: tuple[int, int], generator: torch.Generator | list[torch.Generator] | None, device: torch.device
) -> torch.Tensor:
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def sample_tokens(
    head: nn.Module,
    cond: torch.Tensor,
    scheduler: SchedulerMixin,
    num_inference_steps: int | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    init_noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    return_trajectory: bool = False,
    conditional_only: bool = False,
    hoist_modulations: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample one latent token per condition row with the diffusion head (upstream `DiffLoss.sample`).

    Args:
        head: a `HarmonDiffusionHead` (anything with `cond_embed`, `time_embed`, `forward_embedded` and
            `config.in_channels`; other modules are called as `head(x, t, c)` / `head.forward_with_cfg`).
        cond: `(N, cond_channels)` conditions. With `guidance_scale != 1` the rows are `[conditional; unconditional]`
            (N even) and the network sees the first half of x for both halves (upstream `forward_with_cfg`: eps is
            guided, each half keeps its own variance values).
        scheduler: `HarmonDDPMScheduler` (upstream's sampler) or a DDIM / DPM-Solver scheduler built with the same
            betas and `variance_type=None` (see `HarmonDDPMScheduler.compatible_scheduler`), which gets the eps half
            (DDIM runs with its default eta = 0, i.e. deterministically).
        num_inference_steps: reverse steps; default `scheduler.config.num_inference_steps`, else the count of the
            scheduler's last `set_timesteps`. `set_timesteps` is called here (multistep schedulers are stateful).
        guidance_scale: classifier-free guidance scale on eps.
        temperature: multiplies the per-step noise of `HarmonDDPMScheduler` (0 = deterministic given the initial
            noise) and of stochastic (`sde-*`) DPM-Solvers; deterministic schedulers (DDIM with eta 0, ODE DPM-Solver)
            have no per-step noise and ignore it (logged once).
        generator: randomness for the initial noise (if `init_noise` is None) and the per-step noise (if `step_noise`
            is None). A single generator draws like upstream: initial noise `(N', C)` at once (N' = N/2 with
            guidance, duplicated; N otherwise), then at each step that needs noise one `(N, C)` draw. A list of N'
            generators (one per conditional row) makes row i draw only from generator i: its initial noise, then at
            each step one `(C,)` vector (used for row i and, with guidance, for its unconditional twin N'+i). Rows of
            a batch then get exactly the values they get alone (same seeds -> same tokens, whatever the batch).
        init_noise: `(N', C)` injected initial noise (duplicated with guidance).
        step_noise: injected per-step noise in consumption order: a `(S, N, C)` tensor or a callable `j -> (N, C)`
            (j = the j-th reverse step, 0 = the noisiest). Only requested when used (not at the last DDPM step nor
            with temperature 0; at every step of a stochastic DPM-Solver; never by deterministic schedulers).
        return_trajectory: also return x after every step.
        conditional_only: with guidance, step and return only the conditional half `(N/2, C)`. The network sees
            `x[:N/2]` for both halves, so the unconditional half of x is never used: its scheduler step is waste
            (upstream runs it and throws it away). The conditional rows are identical to the full run's.
        hoist_modulations: for a head with `modulations` / `forward_modulated` (`HarmonDiffusionHead`), compute the
            adaLN modulations of many steps in one batched call per layer (chunks of `modulation_chunk_steps` steps,
            at most `MODULATION_CHUNK_BYTES`) instead of one small GEMM per step and layer. Same operations on the same
            values; a large GEMM may round differently from many small ones (last-ulp differences, within the
            fixture tolerances), and it is 2-3x faster for a wide head on a CPU. False = one `forward_embedded` per
            step (the reference path).
    Returns:
        `(N, C)` float32 tokens (`(N/2, C)` with `conditional_only`), and with `return_trajectory` the `(S, N, C)`
        trajectory (last entry = the result).
    """
    if cond.ndim != 2:
        raise ValueError(f"cond must be (N, cond_channels), got shape {tuple(cond.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rows = cond.shape[0]
    use_cfg = guidance_scale != 1.0
    if use_cfg and rows % 2:
        raise ValueError(f"with guidance_scale != 1 the rows must be [cond; uncond] (even), got N={rows}")
    n_draw = rows // 2 if use_cfg else rows
    is_harmon = isinstance(scheduler, HarmonDDPMScheduler)
    if not is_harmon and isinstance(scheduler, DDPMScheduler):
        # its step draws noise itself (no variance_noise, no temperature): rows could not be seeded or injected
        raise ValueError(
            "a stock DDPMScheduler cannot take temperature or injected noise; use "
            "HarmonDDPMScheduler.from_config(scheduler.config) instead"
        )
    # (only for classes that read `variance_type`: DDIM takes it over from a Harmon config via from_config but
    # ignores it; DPM-Solver would keep 3 channels of a learned-range output)
    if (
        not is_harmon
        and "variance_type" in inspect.signature(type(scheduler).__init__).parameters
        and getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    ):
        raise ValueError(
            f"{type(scheduler).__name__} with variance_type={scheduler.config.variance_type!r} cannot be fed the eps "
            f"half; build it with variance_type=None ({type(scheduler).__name__}.from_config(config, "
            "variance_type=None), or HarmonDDPMScheduler.compatible_scheduler)"
        )
    if isinstance(generator, list) and len(generator) != n_draw:
        raise ValueError(f"got {len(generator)} generators for {n_draw} rows (one per conditional row)")

    if num_inference_steps is None:
        num_inference_steps = getattr(scheduler.config, "num_inference_steps", None) or getattr(
            scheduler, "num_inference_steps", None
        )
        if num_inference_steps is None:
            raise ValueError(f"num_inference_steps is required for {type(scheduler).__name__} (it has no default)")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    device = cond.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    t_values = timesteps.tolist()  # one host sync; python ints below avoid one per step
    num_steps = len(t_values)

    channels = head.config.in_channels
    if init_noise is None:
        x_half = _draw((n_draw, channels), generator, device)
    else:
        if tuple(init_noise.shape) != (n_draw, channels):
            raise ValueError(f"init_noise must be ({n_draw}, {channels}), got {tuple(init_noise.shape)}")
        x_half = init_noise.to(device, torch.float32)
    x = torch.cat([x_half, x_half]) if use_cfg else x_half
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
        x = x * scheduler.init_noise_sigma
    if isinstance(step_noise, torch.Tensor) and tuple(step_noise.shape) != (num_steps, rows, channels):
        raise ValueError(f"step_noise must be ({num_steps}, {rows}, {channels}), got {tuple(step_noise.shape)}")

    stochastic = temperature != 0 and (is_harmon or _is_stochastic(scheduler))
    if not is_harmon and not _is_stochastic(scheduler) and temperature not in (0.0, 1.0):
        name = type(scheduler).__name__
        if name not in _warned_ignored_temperature:
            _warned_ignored_temperature.add(name)
            logger.warning(f"{name} is deterministic: temperature={temperature} has no effect")

    cond_only = conditional_only and use_cfg
    if cond_only:
        x = x[:n_draw]  # the unconditional half is never read (see `conditional_only`)
    stepped_rows = n_draw if cond_only else rows

    def noise_for(j: int) -> torch.Tensor:
        if step_noise is not None:
            noise = step_noise[j] if isinstance(step_noise, torch.Tensor) else step_noise(j)
            if tuple(noise.shape) != (rows, channels) and not (cond_only and tuple(noise.shape) == (n_draw, channels)):
                raise ValueError(f"step_noise({j}) must be ({rows}, {channels}), got {tuple(noise.shape)}")
            if noise.shape[0] != stepped_rows:
                noise = noise[:stepped_rows]
            return noise if noise.dtype == torch.float32 and noise.device == device else noise.to(device, torch.float32)
        if isinstance(generator, list):
            half = _draw((n_draw, channels), generator, device)
            return half if cond_only or not use_cfg else torch.cat([half, half])
        # one (rows, C) draw even when only the conditional half is used: the random stream stays the same
        return _draw((rows, channels), generator, device)[:stepped_rows]

    # Step-invariant work, hoisted: the condition embedding, and the timestep embeddings of all steps in one call
    # (one row per step, broadcast over the batch: the network only sees t through y = t_emb + c_emb).
    embedded = all(hasattr(head, a) for a in ("cond_embed", "time_embed", "forward_embedded"))
    hoist = embedded and hoist_modulations and all(hasattr(head, a) for a in ("modulations", "forward_modulated"))
    head_dtype = next((p.dtype for p in head.parameters()), torch.float32)
    if embedded:
        c_emb = head.cond_embed(cond.to(head_dtype))
        t_emb = head.time_embed(timesteps.to(device))
    if hoist:
        width = c_emb.shape[-1]
        per_step = rows * width * (3 * len(head.res_blocks) + 2) * c_emb.element_size()
        chunk = modulation_chunk_steps(rows, width, per_step, num_steps)
    step_mods: list = []
    # The per-step work as few tensor operations as possible (see `inference_body` and `FusedReverseSteps`): with a
    # few rows per step, per-operation overhead is most of the head's time.
    body = head.inference_body() if hoist and not torch.is_grad_enabled() else None
    body = body or getattr(head, "forward_modulated", None)
    fused_step = scheduler.fused_reverse_steps(device) if is_harmon else None

    trajectory = []
    for j, t in enumerate(t_values):
        x_in = x if is_harmon else scheduler.scale_model_input(x, t)  # DDPM's scaling is the identity
        if embedded:
            # the network sees the conditional half of x for both halves
            half = x_in if cond_only else x_in[:n_draw]
            net_x = torch.cat([half, half]) if use_cfg else x_in
            if hoist:
                if j % chunk == 0:
                    # modulations of steps j .. j+chunk-1 at once; y = t_emb + c_emb as in the per-step path
                    mods = head.modulations(t_emb[j : j + chunk, None, :] + c_emb[None])
                    # per layer: the (k, rows, W) tensors -> per step, one list of per-layer tuples of (rows, W) views
                    per_layer = [list(zip(*(m.unbind(0) for m in group))) for group in mods]
                    step_mods = [list(layers) for layers in zip(*per_layer)]
                if net_x.dtype != head_dtype:
                    net_x = net_x.to(head_dtype)
                out = body(net_x, step_mods[j % chunk])
            else:
                out = head.forward_embedded(net_x.to(head_dtype), t_emb[j] + c_emb)
            if out.dtype != torch.float32:
                out = out.float()
            if use_cfg:
                cond_out, uncond_out = out.chunk(2)
                # uncond + scale * (cond - uncond) over all channels in one op; only the eps half of it is used
                eps = torch.lerp(uncond_out, cond_out, guidance_scale)[:, :channels]
                if cond_only:
                    var_values = cond_out[:, channels:]
                else:
                    eps, var_values = torch.cat([eps, eps]), out[:, channels:]
            else:
                eps, var_values = out[:, :channels], out[:, channels:]
        else:
            full_x = torch.cat([x_in, x_in]) if cond_only else x_in
            t_vec = torch.full((rows,), t, device=device, dtype=torch.long)
            x_h, c_h = full_x.to(head_dtype), cond.to(head_dtype)
            out = (head.forward_with_cfg(x_h, t_vec, c_h, guidance_scale) if use_cfg else head(x_h, t_vec, c_h)).float()
            if cond_only:
                out = out[:n_draw]
            eps, var_values = out[:, :channels], out[:, channels:]

        if is_harmon:
            needs_noise = stochastic and j != num_steps - 1  # the last respaced step adds no noise
            noise = noise_for(j) if needs_noise else None
            if fused_step is not None:
                x = fused_step(j, eps, var_values, x, noise, temperature)
            else:
                out = torch.cat([eps, var_values], dim=1)
                x = scheduler.step(out, t, x, temperature=temperature, variance_noise=noise).prev_sample
        else:
            kwargs = {"variance_noise": noise_for(j) * temperature} if stochastic else {}
            x = scheduler.step(eps, t, x, **kwargs).prev_sample.float()
        if return_trajectory:
            trajectory.append(x)
    return (x, torch.stack(trajectory)) if return_trajectory else x


__all__ = [
    "DiffusionTables",
    "HarmonDDPMScheduler",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "sample_tokens",
]
