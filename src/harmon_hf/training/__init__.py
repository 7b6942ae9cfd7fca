"""Training Harmon with transformers' Trainer: data sources, mixed-task sampling, collator, trainer, stages.

See docs/training.md and examples/train.py.
"""

from .collator import HarmonDataCollator
from .data import (
    CAPTION_PROMPTS,
    DENSE_CAPTION_PROMPTS,
    IMAGE_TO_TEXT,
    SHORT_CAPTION_PROMPTS,
    TEXT_TO_IMAGE,
    BrokenExampleError,
    HFDatasetSource,
    ImageFolderSource,
    ImageTextDataset,
    ImageTextRecord,
    ImageTextSource,
    ListSource,
    MixedTaskDataset,
    build_task_dataset,
    load_source,
)
from .latents import LatentCache, attach_latent_cache, build_latent_cache
from .sampler import MixedTaskBatchSampler, parse_task_ratio
from .stages import MODULE_GROUPS, count_parameters, resolve_trainable_prefixes, set_trainable_modules
from .trainer import HarmonTrainer, HarmonTrainingArguments

__all__ = [
    "BrokenExampleError",
    "CAPTION_PROMPTS",
    "DENSE_CAPTION_PROMPTS",
    "HFDatasetSource",
    "HarmonDataCollator",
    "HarmonTrainer",
    "HarmonTrainingArguments",
    "IMAGE_TO_TEXT",
    "ImageFolderSource",
    "ImageTextDataset",
    "ImageTextRecord",
    "ImageTextSource",
    "LatentCache",
    "ListSource",
    "MODULE_GROUPS",
    "MixedTaskBatchSampler",
    "MixedTaskDataset",
    "SHORT_CAPTION_PROMPTS",
    "TEXT_TO_IMAGE",
    "attach_latent_cache",
    "build_latent_cache",
    "build_task_dataset",
    "count_parameters",
    "load_source",
    "parse_task_ratio",
    "resolve_trainable_prefixes",
    "set_trainable_modules",
]
