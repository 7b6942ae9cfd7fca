"""Shared helpers of the benchmark scripts: benchmark configs, fast random-weight models, memory and part timers.

Not part of the package (benchmarks only): random weights are built on the meta device and filled in place, which
takes a second or two for the 0.5B shapes instead of transformers' per-module initialisation.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from harmon_hf import HarmonConfig, HarmonForConditionalGeneration

# ----- benchmark configurations ------------------------------------------------------------------------------------
REAL_VAE = dict(block_out_channels=[128, 128, 256, 256, 512], sample_size=256)


@dataclass(frozen=True)
class BenchConfig:
    """One model shape of the benchmarks: its `HarmonConfig` builder, image side and reference MAR rounds."""

    name: str
    build: Callable[[], HarmonConfig]
    image_size: int
    rounds: tuple[int, ...]  # measured by default
    reference_rounds: int  # the configuration's nominal rounds (fewer = "reduced")
    description: str = ""


def small_config() -> HarmonConfig:
    """LLM 256 wide x 4 layers, MAR 256 wide 4+4 blocks, head 3 x 256, the real kl16 VAE widths, 256 px."""
    text = dict(
        model_type="qwen2",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        tie_word_embeddings=True,
    )
    mar = dict(
        encoder_embed_dim=256,
        encoder_depth=4,
        encoder_num_heads=4,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=4,
    )
    head = dict(model_channels=256, num_res_blocks=3, cond_channels=256)
    return HarmonConfig(
        text_config=text,
        mar_config=mar,
        diffusion_head_config=head,
        vae_config=dict(REAL_VAE),
        image_token_id=2000,
        image_size=256,
    )


CONFIGS: dict[str, BenchConfig] = {
    "tiny": BenchConfig("tiny", HarmonConfig.tiny, 64, (16,), 16, "HarmonConfig.tiny() (the fixture's shapes)"),
    "small": BenchConfig(
        "small", small_config, 256, (16,), 16, "LLM 256x4, MAR 256 4+4, head 3x256, real kl16 VAE widths"
    ),
    "0.5b": BenchConfig(
        "0.5b", HarmonConfig.harmon_0_5b, 256, (4, 64), 64, "Harmon-0.5B shapes (HarmonConfig.harmon_0_5b())"
    ),
    "1.5b": BenchConfig(
        "1.5b", HarmonConfig.harmon_1_5b, 512, (4,), 64, "Harmon-1.5B shapes (HarmonConfig.harmon_1_5b())"
    ),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----- arithmetic -------------------------------------------------------------------------------------------------
def head_flops_per_row_step(config) -> int:
    """Matrix-product FLOPs (2 per multiply-add) of one head evaluation for one row: input projection, per block the
    MLP's two products and the adaLN product (3 widths out), the final adaLN product (2 widths) and output layer."""
    width = config.model_channels
    per_row = config.in_channels * width + config.num_res_blocks * 5 * width * width + 2 * width * width
    return 2 * (per_row + width * config.out_channels)


# ----- random-weight models ------------------------------------------------------------------------------------------
@torch.no_grad()
def fill_random_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter in place: matrices N(0, 0.02) (convolutions N(0, 1/fan_in)), norm weights 1, biases and
    other vectors N(0, 0.01); `generator` on the parameters' device."""
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            std = 0.02 if param.ndim == 2 else 1.0 / math.sqrt(param[0].numel())
            param.normal_(0.0, std, generator=generator)
        elif name.endswith("weight"):  # LayerNorm / RMSNorm / GroupNorm scales
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.01, generator=generator)


@torch.no_grad()
def build_random_model(
    config: HarmonConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> HarmonForConditionalGeneration:
    """A Harmon model with random weights, built without transformers' initialisation (meta device, then filled).

    Matrices get N(0, 0.02) (embeddings too), norm weights 1, biases and other vectors small noise, so activations
    stay finite through the 24-layer LLM (timings must not depend on NaN/denormal paths). The VAE stays float32 as
    `from_pretrained` keeps it (`_keep_in_fp32_modules_strict`).
    """
    with torch.device("meta"):
        model = HarmonForConditionalGeneration(config)
    model.to_empty(device=device)
    fill_random_(model, torch.Generator(device=device).manual_seed(seed))
    # non-persistent buffers (rotary frequencies) are garbage after to_empty: rebuild them
    lm = model.model.language_model
    with torch.device(device):
        lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    if dtype != torch.float32:
        model.to(dtype)
        model.model.vae.float()
    return model


# ----- memory ------------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status_peak_bytes() -> int:
    """Peak RSS of this process since its `exec` (`VmHWM` on Linux).

    Not `getrusage(...).ru_maxrss`: on Linux it survives `execve`, so a subprocess reports its PARENT's peak at the
    time of the fork when that was higher. Falls back to `ru_maxrss` where `/proc` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """Samples the RSS in a background thread (every `interval` s) to find the peak inside a `with` block, which
    `ru_maxrss` (a lifetime maximum) cannot do once an earlier step peaked higher."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ----- per-part timers ------------------------------------------------------------------------------------------------
@dataclass
class PartTimer:
    """Wall-clock seconds spent in named model parts (outermost call only, so nested parts are not double counted)."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _active: int = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self._active:
                return fn(*args, **kwargs)
            self._sync()
            self._active += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1
                self._active -= 1

        return timed


@contextlib.contextmanager
def part_timers(model: HarmonForConditionalGeneration) -> Iterator[PartTimer]:
    """Time the LLM (prefill + every round), the MAR encoder and decoder, the diffusion head's sampling loop (network
    and scheduler, `sample_tokens`) and the VAE decoder, by wrapping them for the duration of the block."""
    import harmon_hf.scheduling_harmon as sched

    timer = PartTimer(model.device)
    inner = model.model
    lm = inner.language_model
    patches = [
        (lm, "forward", "LLM"),
        (inner.mar, "encode", "MAR encoder"),
        (inner.mar, "decode", "MAR decoder"),
        (inner.vae, "decode", "VAE decode"),
        (sched, "sample_tokens", "diffusion head"),
    ]
    saved = []
    for obj, attr, name in patches:
        original = getattr(obj, attr)
        saved.append((obj, attr, original, attr in vars(obj)))
        setattr(obj, attr, timer.wrap(name, original))
    try:
        yield timer
    finally:
        for obj, attr, original, was_own in saved:
            if was_own or obj is sched:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
