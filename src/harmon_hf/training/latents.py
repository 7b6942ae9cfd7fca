"""Optional cache of VAE latent tokens for text-to-image training.

The VAE is frozen and Harmon encodes with the posterior MEAN, so the latent tokens of an image are a fixed function
of its preprocessed pixels. When the preprocessing is deterministic too (`t2i_crop="center"`; upstream's random crop
is not, unless every image is square), the tokens can be computed once and the training step skips the VAE encoder.

File layout (`<dir>/latents_<resolution>px.safetensors`): `tokens` float32 `(N, S/16, S/16, C)` and `valid` uint8
`(N,)` (0 = the example was broken when the cache was built), with metadata `resolution`, `num_examples`, `crop`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import TEXT_TO_IMAGE, ImageTextDataset

logger = logging.getLogger(__name__)


class LatentCache:
    """Read access to a latent cache file (opened lazily, so it can be shipped to dataloader workers)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as f:
            self.metadata = dict(f.metadata() or {})
            self.valid = f.get_tensor("valid").bool()
        self._handle: Any = None

    def __len__(self) -> int:
        return int(self.valid.numel())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def get(self, index: int) -> torch.Tensor | None:
        """Tokens `(m, n, C)` of example `index`, or None if it was broken."""
        if not bool(self.valid[index]):
            return None
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle.get_slice("tokens")[index]

    def check(self, dataset: ImageTextDataset) -> None:
        """Raise if the cache was not built for this dataset's size and preprocessing."""
        expected = {"resolution": str(dataset.resolution), "num_examples": str(len(dataset)), "crop": dataset.t2i_crop}
        found = {k: self.metadata.get(k) for k in expected}
        if found != expected:
            raise ValueError(f"Latent cache {self.path} was built for {found}, the dataset needs {expected}.")


def cache_file(cache_dir: str | os.PathLike, resolution: int) -> Path:
    """Where the cache of a resolution lives."""
    return Path(cache_dir) / f"latents_{resolution}px.safetensors"


@torch.no_grad()
def build_latent_cache(
    model: Any, dataset: ImageTextDataset, cache_dir: str | os.PathLike, batch_size: int = 16
) -> LatentCache:
    """Encode every text-to-image example once (posterior mean x vae_scale) and write the cache file.

    Args:
        model: `HarmonForConditionalGeneration` (only its VAE runs, on the model's device).
        dataset: the text-to-image `ImageTextDataset`; must use `t2i_crop="center"`.
        cache_dir: output folder.
        batch_size: images per VAE call.
    Returns:
        the `LatentCache`, also attached to `dataset.latent_cache`.
    """
    if dataset.task != TEXT_TO_IMAGE:
        raise ValueError("Only text-to-image data can be cached.")
    if dataset.t2i_crop != "center":
        raise ValueError("Latent caching needs deterministic preprocessing: set t2i_crop='center'.")
    dataset.latent_cache = None
    n = len(dataset)
    grid = dataset.resolution // model.config.image_stride
    tokens = torch.zeros(n, grid, grid, model.config.mar_config.token_dim)
    valid = torch.zeros(n, dtype=torch.uint8)
    device = next(model.parameters()).device
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            pixels = torch.stack([p for _, p in pending]).to(device)
            encoded = model.encode_images(pixels).float().cpu()
            for (index, _), value in zip(pending, encoded):
                tokens[index] = value
                valid[index] = 1
            pending.clear()

    broken = 0
    for index in range(n):
        try:
            image = dataset.load_image(dataset.record(index))
            pending.append((index, dataset.preprocess_t2i(image)))
        except Exception as err:  # broken examples are recorded, not fatal
            broken += 1
            logger.warning(f"Latent cache: skipping broken example {index}: {err}")
        if len(pending) >= batch_size:
            flush()
    flush()
    path = cache_file(cache_dir, dataset.resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    metadata = {"resolution": str(dataset.resolution), "num_examples": str(n), "crop": dataset.t2i_crop}
    save_file({"tokens": tokens.contiguous(), "valid": valid}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    logger.info(f"Cached the latents of {n - broken}/{n} text-to-image examples in {path}.")
    cache = LatentCache(path)
    dataset.latent_cache = cache
    return cache


def attach_latent_cache(
    model: Any, dataset: ImageTextDataset, cache_dir: str | os.PathLike, batch_size: int = 16
) -> LatentCache:
    """Load the cache for `dataset` from `cache_dir` if it exists and fits, else build it."""
    path = cache_file(cache_dir, dataset.resolution)
    if path.is_file():
        cache = LatentCache(path)
        cache.check(dataset)
        dataset.latent_cache = cache
        return cache
    return build_latent_cache(model, dataset, cache_dir, batch_size)


__all__ = ["LatentCache", "attach_latent_cache", "build_latent_cache", "cache_file"]
