"""Optional cache of VAE latent tokens for training (both tasks).

The VAE is frozen and Harmon encodes with the posterior MEAN, so the latent tokens of an image are a fixed function
of its preprocessed pixels. When the preprocessing is deterministic, the tokens can be computed once and the training
step skips the VAE encoder: always for understanding (pad to a square + resize), and for generation with
`t2i_crop="center"` (upstream's random crop is not deterministic, unless every image is square).

One file per task and resolution in the cache folder: `latents_<S>px.safetensors` (text-to-image) and
`latents_image2text_<S>px.safetensors`. Each holds `tokens` float32 `(U, S/16, S/16, C)` for the U distinct pictures
and `rows` int64 `(N,)`, the row of each of the N examples (-1 = the example was broken when the cache was built);
metadata `resolution`, `num_examples`, `task`, `crop` (`"center"` or, for understanding, `"pad"`). Examples that share
an image file are encoded once; an image whose preprocessed pixels are identical in an already built cache of the
other task (square pictures at the model's size) is copied from it instead of encoded again. Files of the first
format (`tokens` `(N, ...)` and a `valid` mask, text-to-image only) are still read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import IMAGE_TO_TEXT, TEXT_TO_IMAGE, ImageTextDataset

logger = logging.getLogger(__name__)


def _crop_name(dataset: ImageTextDataset) -> str:
    return "pad" if dataset.task == IMAGE_TO_TEXT else dataset.t2i_crop


class LatentCache:
    """Read access to a latent cache file (opened lazily, so it can be shipped to dataloader workers)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as f:
            self.metadata = dict(f.metadata() or {})
            if "rows" in f.keys():
                self.rows = f.get_tensor("rows").long()
            else:  # first format: one token row per example, `valid` marks the readable ones
                valid = f.get_tensor("valid").bool()
                self.rows = torch.where(valid, torch.arange(valid.numel()), -1)
        self.metadata.setdefault("task", TEXT_TO_IMAGE)
        self._handle: Any = None

    @property
    def valid(self) -> torch.Tensor:
        """`(N,)` bool: the examples that have tokens."""
        return self.rows >= 0

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def get(self, index: int) -> torch.Tensor | None:
        """Tokens `(m, n, C)` of example `index`, or None if it was broken."""
        row = int(self.rows[index])
        if row < 0:
            return None
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle.get_slice("tokens")[row]

    def check(self, dataset: ImageTextDataset) -> None:
        """Raise if the cache was not built for this dataset's task, size and preprocessing."""
        expected = {
            "task": dataset.task,
            "resolution": str(dataset.resolution),
            "num_examples": str(len(dataset)),
            "crop": _crop_name(dataset),
        }
        found = {k: self.metadata.get(k) for k in expected}
        if found != expected:
            raise ValueError(
                f"Latent cache {self.path} was built for {found}, the dataset needs {expected}; delete the file (or "
                "use another cache folder) to rebuild it."
            )


def cache_file(cache_dir: str | os.PathLike, resolution: int, task: str = TEXT_TO_IMAGE) -> Path:
    """Where the cache of a task and resolution lives."""
    prefix = "latents" if task == TEXT_TO_IMAGE else f"latents_{task}"
    return Path(cache_dir) / f"{prefix}_{resolution}px.safetensors"


@torch.no_grad()
def build_latent_cache(
    model: Any,
    dataset: ImageTextDataset,
    cache_dir: str | os.PathLike,
    batch_size: int = 16,
    reuse: Sequence[ImageTextDataset] = (),
) -> LatentCache:
    """Encode every distinct picture of `dataset` once (posterior mean x vae_scale) and write the cache file.

    Args:
        model: `HarmonForConditionalGeneration` (only its VAE runs, on the model's device).
        dataset: an `ImageTextDataset` of either task (text-to-image needs `t2i_crop="center"`).
        cache_dir: output folder.
        batch_size: images per VAE call.
        reuse: datasets with a latent cache attached (the other task on the same pictures): a picture whose
            preprocessed pixels equal theirs takes their tokens instead of a second VAE pass.
    Returns:
        the `LatentCache`, also attached to `dataset.latent_cache`.
    """
    if dataset.task == TEXT_TO_IMAGE and dataset.t2i_crop != "center":
        raise ValueError("Latent caching needs deterministic preprocessing: set t2i_crop='center'.")
    dataset.latent_cache = None
    donors = {}
    for other in reuse:
        if other.latent_cache is None or other.resolution != dataset.resolution:
            continue
        valid = other.latent_cache.valid.tolist()
        for index in range(len(other)):
            key = other.image_key(index) if valid[index] else None
            if key is not None:
                donors.setdefault(key, (other, index))
    n = len(dataset)
    # the VAE's own device: a training script moves only the VAE to the accelerator for this pass
    device = next(model.model.vae.parameters()).device
    rows = torch.full((n,), -1, dtype=torch.long)
    unique: list[torch.Tensor | None] = []  # token rows; None until the pending batch is encoded
    row_of_key: dict[str, int] = {}
    pending: list[tuple[int, torch.Tensor]] = []  # (row, pixels)
    counts = {"encoded": 0, "shared": 0, "copied": 0, "broken": 0}

    def flush() -> None:
        if pending:
            pixels = torch.stack([p for _, p in pending]).to(device)
            encoded = model.encode_images(pixels).float().cpu()
            for (row, _), value in zip(pending, encoded):
                unique[row] = value
            pending.clear()

    for index in range(n):
        try:
            key = dataset.image_key(index)
            if key is not None and key in row_of_key:  # the same file as an earlier example
                rows[index] = row_of_key[key]
                counts["shared"] += 1
                continue
            image = dataset.load_image(dataset.record(index))
            pixels = dataset.preprocess(image)
        except Exception as err:  # broken examples are recorded, not fatal
            counts["broken"] += 1
            logger.warning(f"Latent cache: skipping broken example {index}: {err}")
            continue
        row = len(unique)
        donor = donors.get(key) if key is not None else None
        if donor is not None and torch.equal(pixels, donor[0].preprocess(image)):
            unique.append(donor[0].latent_cache.get(donor[1]).float())
            counts["copied"] += 1
        else:
            unique.append(None)
            pending.append((row, pixels))
            counts["encoded"] += 1
        rows[index] = row
        if key is not None:
            row_of_key[key] = row
        if len(pending) >= batch_size:
            flush()
    flush()
    grid = dataset.resolution // model.config.image_stride
    tokens = torch.stack(unique) if unique else torch.zeros(0, grid, grid, model.config.mar_config.token_dim)
    path = cache_file(cache_dir, dataset.resolution, dataset.task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    metadata = {
        "task": dataset.task,
        "resolution": str(dataset.resolution),
        "num_examples": str(n),
        "crop": _crop_name(dataset),
    }
    save_file({"tokens": tokens.contiguous(), "rows": rows}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a crash while writing never leaves a half-written cache behind
    logger.info(
        f"Cached the {dataset.task} latents of {n - counts['broken']}/{n} examples in {path} ({len(unique)} pictures: "
        f"{counts['encoded']} encoded, {counts['copied']} copied from the other task's cache; "
        f"{counts['shared']} examples share a picture)."
    )
    cache = LatentCache(path)
    dataset.latent_cache = cache
    return cache


def attach_latent_cache(
    model: Any,
    dataset: ImageTextDataset,
    cache_dir: str | os.PathLike,
    batch_size: int = 16,
    reuse: Sequence[ImageTextDataset] = (),
) -> LatentCache:
    """Load the cache for `dataset` from `cache_dir` if it exists and fits, else build it (`build_latent_cache`)."""
    path = cache_file(cache_dir, dataset.resolution, dataset.task)
    if path.is_file():
        cache = LatentCache(path)
        cache.check(dataset)
        dataset.latent_cache = cache
        return cache
    return build_latent_cache(model, dataset, cache_dir, batch_size, reuse=reuse)


__all__ = ["LatentCache", "attach_latent_cache", "build_latent_cache", "cache_file"]
