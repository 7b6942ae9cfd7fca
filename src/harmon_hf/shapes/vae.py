"""A small kl16-style KL autoencoder for the Harmon-Shapes world, trained from scratch on CPU.

Same layout as Harmon's kl16 (diffusers `AutoencoderKL`: four `DownEncoderBlock2D` + one `AttnDownEncoderBlock2D`,
five `UpDecoderBlock2D`, stride 16, 16 latent channels, attention in the mid blocks), only narrower and with one
residual block per encoder level. Loss: L1 + MSE reconstruction of a posterior sample plus a small KL term. Harmon
feeds its MAR with `posterior mean * scaling_factor`; `train_vae` measures the spread of the posterior means on
held-out pictures and (by default) stores `scaling_factor = 1 / std` so that the scaled latents have unit std.

`harmon_vae_kwargs(vae)` gives the `HarmonVAEConfig` fields (= `AutoencoderKL` keyword arguments).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from .data import ShapesWorld, make_scene
from .eval import ShapeDetector, match_spec

__all__ = [
    "HARMON_VAE_KEYS",
    "VAETrainingConfig",
    "build_vae",
    "cut_and_paste",
    "decode_latents",
    "encode_images",
    "harmon_vae_kwargs",
    "latent_statistics",
    "patch_locality_loss",
    "reconstruct",
    "save_comparison_grid",
    "train_vae",
    "vae_loss",
    "vae_quality",
]

# The `HarmonVAEConfig` fields, all `AutoencoderKL` keyword arguments.
HARMON_VAE_KEYS: tuple[str, ...] = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)

HARMON_SCALING_FACTOR = 0.2325  # kl16's latent scale


@dataclass
class VAETrainingConfig:
    """Architecture and training settings of the shapes autoencoder.

    Attributes:
        block_out_channels: widths of the five levels; norm_num_groups must divide each.
        layers_per_block: residual blocks per encoder level (the decoder has one more).
        norm_num_groups: GroupNorm groups.
        latent_channels: 16 as kl16.
        resolution: image side (multiple of 16).
        steps, batch_size: optimisation steps and pictures per step (fresh train-split pictures every step).
        lr, min_lr_ratio, warmup_steps: AdamW learning rate, cosine decay to `lr * min_lr_ratio` after warm-up.
        foreground_weight: extra reconstruction weight of shape pixels (see `vae_loss`).
        l1_weight, mse_weight, kl_weight: loss weights; the KL term is the posterior KL summed over the latent and
            divided by the number of pixel values (so that it is on the scale of the mean reconstruction errors).
        time_limit_minutes: safety net: stop early when training reaches this wall time (None: no limit); the
            default 1500 steps took 10.5-28 min on the 2-core machines measured, so set None to let `steps` alone decide.
        seed: weights / sampling seed.
        data_split, data_seed: where the training pictures come from (`data.make_scene`); "all" covers every
            colour/shape combination (the autoencoder reads no text, so nothing is held out from it).
        num_threads: torch CPU threads (None: leave as is).
        log_every: steps between log lines; eval_images: held-out pictures for the final report.
        set_scaling_factor: store `1 / std` of the posterior means as `scaling_factor` (else keep 0.2325).
        attention: kl16's self-attention (last encoder level and both mid blocks). Without it every latent token is
            computed by convolutions alone (see `build_vae`).
        locality_weight: weight of the patch-locality term (`vae_loss`, `patch_locality_loss`); 0 = off. It pulls
            each latent token towards describing its own 16 x 16 patch rather than the whole picture (measured in
            the Harmon-Shapes model card: more local tokens, a worse codec).
    """

    block_out_channels: tuple[int, ...] = (32, 32, 64, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    latent_channels: int = 16
    resolution: int = 64
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-5
    foreground_weight: float = 4.0
    time_limit_minutes: float | None = 12.0
    seed: int = 0
    data_split: str = "all"
    data_seed: int = 0
    num_threads: int | None = 2
    log_every: int = 50
    eval_images: int = 256
    set_scaling_factor: bool = True
    attention: bool = True
    locality_weight: float = 0.0
    world: dict[str, Any] | None = field(default=None)


def build_vae(
    block_out_channels: Sequence[int] = (32, 32, 64, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 16,
    latent_channels: int = 16,
    sample_size: int = 64,
    scaling_factor: float = HARMON_SCALING_FACTOR,
    attention: bool = True,
) -> AutoencoderKL:
    """A kl16-layout `AutoencoderKL` (stride 16: four downsampling levels + a last level).

    With `attention` (kl16's layout) the last encoder level and the encoder's and decoder's mid blocks hold a
    self-attention layer over all latent positions. `attention=False` replaces them by the plain residual blocks
    (`mid_block_add_attention=False`); at 64 px (a 4 x 4 latent grid) the convolutions alone still see the whole
    picture.
    """
    if len(block_out_channels) != 5:
        raise ValueError("the kl16 layout has five levels (stride 16)")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D" if attention else "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"] * 5,
        block_out_channels=list(block_out_channels),
        layers_per_block=layers_per_block,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=False,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=attention,
    )


def harmon_vae_kwargs(vae: AutoencoderKL) -> dict[str, Any]:
    """The `HarmonVAEConfig` fields of `vae` (JSON-friendly: lists, not tuples)."""
    out = {}
    for key in HARMON_VAE_KEYS:
        value = vae.config[key]
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


# ------------------------------------------------------------------------------------------------------------------
# conversions
# ------------------------------------------------------------------------------------------------------------------
def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 `(N, H, W, 3)` -> float32 `(N, 3, H, W)` in [-1, 1] (Harmon's `2 * v / 255 - 1`)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float `(N, 3, H, W)` in [-1, 1] -> uint8 `(N, H, W, 3)` (Harmon's `clamp(127.5 x + 128)` truncation)."""
    levels = (pixels.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return levels.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Posterior means of uint8 images `(N, H, W, 3)`, unscaled: `(N, C, H/16, W/16)`."""
    out = [
        vae.encode(to_pixels(images[i : i + batch_size])).latent_dist.mean for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Unscaled latents -> uint8 images `(N, H, W, 3)`."""
    out = [to_uint8(vae.decode(latents[i : i + batch_size]).sample) for i in range(0, len(latents), batch_size)]
    return np.concatenate(out)


def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode (posterior mean, as Harmon) and decode uint8 images."""
    return decode_latents(vae, encode_images(vae, images, batch_size), batch_size)


def save_comparison_grid(
    inputs: np.ndarray, outputs: np.ndarray, path: str | Path, columns: int = 8, zoom: int = 2
) -> None:
    """Save pairs of rows (inputs above, reconstructions below) as one PNG."""
    n, h, w, _ = inputs.shape
    rows = math.ceil(n / columns)
    pad = 2
    grid = Image.new("RGB", (columns * (w + pad), rows * 2 * (h + pad) + rows * pad), (0, 0, 0))
    for i in range(n):
        x = (i % columns) * (w + pad)
        y = (i // columns) * (2 * (h + pad) + pad)
        grid.paste(Image.fromarray(inputs[i]), (x, y))
        grid.paste(Image.fromarray(outputs[i]), (x, y + h + pad))
    grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST).save(path)


# ------------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------------
def vae_loss(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    l1_weight: float = 1.0,
    mse_weight: float = 1.0,
    kl_weight: float = 1e-5,
    generator: torch.Generator | None = None,
    foreground_weight: float = 0.0,
    locality_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss on a batch of pixels `(B, 3, H, W)` in [-1, 1]; returns (loss, {"l1", "mse", "kl"}, plus
    "locality" when `locality_weight` > 0).

    `foreground_weight` > 0 gives pixels that differ from the corner pixel's colour (the shapes; most of a picture
    is background) `1 + foreground_weight` times the weight of the others in the reconstruction terms.

    `locality_weight` > 0 adds `locality_weight * patch_locality_loss(...)`: the encoder also reads a cut-and-paste
    copy of the batch (see `cut_and_paste`) in the same call, and the latent tokens of each part of it should be the
    ones of the picture the part came from.
    """
    batch = pixels.shape[0]
    mixed = None
    if locality_weight > 0:
        mixed, source, cut = cut_and_paste(pixels, generator=generator)
        posterior_all = vae.encode(torch.cat([pixels, mixed])).latent_dist
        means = posterior_all.mean
        posterior = DiagonalGaussianDistribution(posterior_all.parameters[:batch])
    else:
        posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    weight = torch.ones_like(pixels[:, :1])
    if foreground_weight > 0:
        background = pixels[:, :, :1, :1]
        foreground = (pixels - background).abs().amax(1, keepdim=True) > 0.1
        weight = weight + foreground_weight * foreground.float()
    weight = weight / weight.mean()
    l1 = ((recon - pixels).abs() * weight).mean()
    mse = ((recon - pixels).pow(2) * weight).mean()
    kl = posterior.kl().mean() / pixels[0].numel()
    loss = l1_weight * l1 + mse_weight * mse + kl_weight * kl
    parts = {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
    if mixed is not None:
        locality = patch_locality_loss(means[:batch], means[batch:], source, cut)
        loss = loss + locality_weight * locality
        parts["locality"] = locality.item()
    return loss, parts


def cut_and_paste(
    pixels: torch.Tensor, patch: int = 16, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, int]]:
    """A copy of the batch `(B, 3, H, W)` whose pictures are two pictures joined along a latent-token boundary.

    One cut for the whole batch, drawn from `generator`: vertical or horizontal, after 1 .. (side / patch - 1)
    tokens. Picture i keeps its own pixels before the cut and takes picture (i - 1)'s after it.

    Returns:
        (mixed pictures `(B, 3, H, W)`, the batch index each picture's second part came from `(B,)`,
        (axis "w" or "h", cut position in tokens)).
    """
    batch, _, height, width = pixels.shape
    if min(height, width) < 2 * patch:
        raise ValueError(f"cut_and_paste needs at least 2 tokens along each side, got {height} x {width} px")
    axis = "w" if torch.randint(2, (1,), generator=generator).item() == 0 else "h"
    tokens = (width if axis == "w" else height) // patch
    cut = int(torch.randint(1, tokens, (1,), generator=generator).item())
    source = torch.roll(torch.arange(batch), 1)
    return _paste_after(pixels, pixels[source], axis, cut * patch), source, (axis, cut)


def _paste_after(own: torch.Tensor, other: torch.Tensor, axis: str, position: int) -> torch.Tensor:
    """A copy of `own` `(B, C, H, W)` with `other` from `position` on along width (`axis="w"`) or height."""
    joined = own.clone()
    if axis == "w":
        joined[..., position:] = other[..., position:]
    else:
        joined[..., position:, :] = other[..., position:, :]
    return joined


def patch_locality_loss(
    means: torch.Tensor, mixed_means: torch.Tensor, source: torch.Tensor, cut: tuple[str, int]
) -> torch.Tensor:
    """How far the latent tokens of cut-and-paste pictures are from those of the pictures their parts came from.

    Args:
        means: posterior means of the batch `(B, C, h, w)`.
        mixed_means: posterior means of `cut_and_paste`'s pictures `(B, C, h, w)`.
        source, cut: as `cut_and_paste` returned them.

    Returns:
        `sum((mixed - expected)^2) / sum(expected^2)`: scale-free (shrinking every latent does not lower it), 0 when
        each token depends only on its own patch of the picture.
    """
    expected = _paste_after(means, means[source], *cut)
    return (mixed_means - expected).pow(2).sum() / expected.pow(2).sum()


def render_images(world: ShapesWorld, split: str, seed: int, start: int, n: int) -> np.ndarray:
    """Pictures of scenes `start .. start + n - 1` of a split as uint8 `(n, H, W, 3)`."""
    scenes = (make_scene(start + i, split, seed, None, world) for i in range(n))
    return np.stack([np.asarray(scene.render(world), dtype=np.uint8) for scene in scenes])


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: np.ndarray) -> dict[str, Any]:
    """Spread of the posterior means of `images`: raw mean/std, per-channel std, std after the configured scale
    and after kl16's 0.2325, and the scale that gives unit std (`recommended_scaling_factor`)."""
    latents = encode_images(vae, images)
    std = float(latents.std())
    return {
        "mean": float(latents.mean()),
        "std": std,
        "channel_std": [round(float(v), 4) for v in latents.transpose(0, 1).flatten(1).std(1)],
        "abs_max": float(latents.abs().max()),
        "std_scaled_configured": std * float(vae.config.scaling_factor),
        "std_scaled_0.2325": std * HARMON_SCALING_FACTOR,
        "recommended_scaling_factor": round(1.0 / std, 4),
        "latent_shape": list(latents.shape[1:]),
    }


@torch.no_grad()
def vae_quality(vae: AutoencoderKL, world: ShapesWorld | None = None, n: int = 256, seed: int = 7) -> dict[str, Any]:
    """Held-out reconstruction quality: PSNR and the ShapesEval scorer on reconstructions (does the picture still
    show the caption's colours, shapes, count and positions?), on `n` test-split pictures of every kind."""
    world = world or ShapesWorld()
    scenes = [make_scene(i, "test", seed, None, world) for i in range(n)]
    images = np.stack([np.asarray(s.render(world), dtype=np.uint8) for s in scenes])
    recon = reconstruct(vae, images)
    mse = ((recon.astype(np.float64) - images.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
    detector = ShapeDetector(world)
    scores = [match_spec(s.spec, detector.detect(r)) for s, r in zip(scenes, recon)]
    novel = [r["correct"] for s, r in zip(scenes, scores) if s.novel]
    seen = [r["correct"] for s, r in zip(scenes, scores) if not s.novel]
    kinds = sorted({s.spec.kind for s in scenes})
    per_kind = {
        k: sum(r["correct"] for s, r in zip(scenes, scores) if s.spec.kind == k)
        / max(1, sum(s.spec.kind == k for s in scenes))
        for k in kinds
    }
    return {
        "psnr": psnr,
        "scorer_accuracy": sum(r["correct"] for r in scores) / len(scores),
        "scorer_accuracy_per_kind": per_kind,
        "scorer_accuracy_novel": sum(novel) / len(novel) if novel else None,
        "scorer_accuracy_seen": sum(seen) / len(seen) if seen else None,
        "colour_rate": sum(r["colour"] for r in scores) / len(scores),
        "shape_rate": sum(r["shape"] for r in scores) / len(scores),
        "n": n,
    }


def train_vae(
    config: VAETrainingConfig | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Train the shapes autoencoder; optionally save it (`save_pretrained` in `out_dir/vae`, plus
    `out_dir/harmon_vae_config.json`, `out_dir/vae_report.json` and `out_dir/vae_reconstructions.png`).

    Returns:
        (vae, report): report holds the config, timing, final losses, latent statistics and held-out quality.
    """
    config = config or VAETrainingConfig()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    world = ShapesWorld.from_dict(config.world) if config.world else ShapesWorld(resolution=config.resolution)
    torch.manual_seed(config.seed)
    vae = build_vae(
        config.block_out_channels,
        config.layers_per_block,
        config.norm_num_groups,
        config.latent_channels,
        world.resolution,
        attention=config.attention,
    )
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.steps, config.warmup_steps, config.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(config.seed)
    num_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE: {num_params / 1e6:.2f} M parameters, {config.steps} steps of {config.batch_size} pictures")
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    step = 0
    for step in range(config.steps):
        images = render_images(world, config.data_split, config.data_seed, step * config.batch_size, config.batch_size)
        loss, parts = vae_loss(
            vae,
            to_pixels(images),
            config.l1_weight,
            config.mse_weight,
            config.kl_weight,
            generator=generator,
            foreground_weight=config.foreground_weight,
            locality_weight=config.locality_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for key, value in {"loss": loss.item(), **parts}.items():
            running[key] = running.get(key, 0.0) + value
        elapsed = time.perf_counter() - start
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            count = (step % config.log_every) + 1
            means = {k: v / count for k, v in running.items()}
            running = {}
            history.append(
                {"step": step + 1, "seconds": round(elapsed, 1), **{k: round(v, 5) for k, v in means.items()}}
            )
            locality = f"  locality {means['locality']:.4f}" if "locality" in means else ""
            log(
                f"step {step + 1:5d}  {elapsed:7.1f}s  loss {means['loss']:.4f}  l1 {means['l1']:.4f}  "
                f"mse {means['mse']:.5f}  kl {means['kl']:.3f}{locality}  lr {scheduler.get_last_lr()[0]:.2e}"
            )
        if config.time_limit_minutes is not None and elapsed > 60 * config.time_limit_minutes:
            log(f"time limit of {config.time_limit_minutes} min reached after {step + 1} steps")
            break
    train_seconds = time.perf_counter() - start
    vae.eval()
    held_out = render_images(world, "test", 11, 0, config.eval_images)
    stats = latent_statistics(vae, held_out)
    if config.set_scaling_factor:
        vae.register_to_config(scaling_factor=stats["recommended_scaling_factor"])
        stats["std_scaled_configured"] = stats["std"] * stats["recommended_scaling_factor"]
    quality = vae_quality(vae, world, n=config.eval_images)
    report = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "parameters": num_params,
        "steps_done": step + 1,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / (step + 1), 3),
        "final": history[-1] if history else {},
        "history": history,
        "latents": stats,
        "quality": quality,
        "harmon_vae_config": harmon_vae_kwargs(vae),
        "torch_threads": torch.get_num_threads(),
    }
    log(
        f"done in {train_seconds / 60:.1f} min: PSNR {quality['psnr']:.2f} dB, scorer on reconstructions "
        f"{quality['scorer_accuracy']:.3f}, latent std {stats['std']:.3f} (x0.2325 -> {stats['std_scaled_0.2325']:.3f}), "
        f"scaling_factor {vae.config.scaling_factor}"
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(out / "vae")
        (out / "harmon_vae_config.json").write_text(json.dumps(harmon_vae_kwargs(vae), indent=1) + "\n")
        (out / "vae_report.json").write_text(json.dumps(report, indent=1) + "\n")
        save_comparison_grid(held_out[:32], reconstruct(vae, held_out[:32]), out / "vae_reconstructions.png")
        log(f"saved to {out}")
    return vae, report
