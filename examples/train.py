#!/usr/bin/env python
"""Train Harmon (any stage) with transformers' Trainer.

    python examples/train.py examples/configs/stage1_alignment.yaml --model_name_or_path harmon-0.5b \\
        --t2i_data data/laion/data_info.json --i2t_data data/cc3m/data_info.json --output_dir out/stage1

The first argument may be a YAML config (a stage preset); any further `--key value` arguments override its entries.
Without a YAML file all arguments come from the command line. Multi-GPU / multi-node: launch the same command with
`accelerate launch` (see examples/configs/accelerate_*.yaml) or `torchrun`; see docs/training.md.

The model comes from a converted folder (`--model_name_or_path`: a pipeline folder with `model/` and `processor/`,
or a model folder with the processor next to it, e.g. the output of an earlier stage), or is built with random
weights from a named config (`--model_config tiny|harmon_0_5b|harmon_1_5b`, with `--processor_name_or_path` a
processor folder or an LLM folder holding the tokenizer). The output folder holds the final model and processor:
`HarmonForConditionalGeneration.from_pretrained(output_dir)` and `HarmonProcessor.from_pretrained(output_dir)`.

`--lora PRESET [PRESET ...]` (with `--lora_r`, `--lora_alpha`, `--lora_dropout`) trains LoRA adapters on the named
parts instead (harmon_hf.lora; any stage): checkpoints and the output folder then hold only the adapter
(`adapter_config.json` + `adapter_model.safetensors`) and the processor; see docs/lora.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import AutoTokenizer, HfArgumentParser, set_seed
from transformers.image_utils import SizeDict
from transformers.trainer_utils import get_last_checkpoint

from harmon_hf.configuration_harmon import HarmonConfig
from harmon_hf.image_processing_harmon import HarmonImageProcessor
from harmon_hf.lora import check_lora_presets_for_tasks, get_harmon_peft_model, lora_preset_names
from harmon_hf.modeling_harmon import HarmonForConditionalGeneration
from harmon_hf.processing_harmon import HarmonProcessor
from harmon_hf.training import (
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    HarmonDataCollator,
    HarmonTrainer,
    HarmonTrainingArguments,
    MixedTaskDataset,
    attach_latent_cache,
    build_task_dataset,
    count_parameters,
    set_trainable_modules,
)

logger = logging.getLogger("harmon_hf.train")

NAMED_CONFIGS = ("tiny", "harmon_0_5b", "harmon_1_5b")


@dataclass
class ModelArguments:
    """Which model to start from and which of its parts train."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Converted Harmon folder: a pipeline folder (model/, processor/) or a model folder."},
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": f"Build a randomly initialised model from a named config instead: one of {NAMED_CONFIGS}."},
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Processor folder, or an LLM folder with the tokenizer (default: from model_name_or_path)."},
    )
    trainable_modules: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "Parts that train: all, llm, mar, mar_encoder, mar_decoder, diffusion_head, proj_in, proj_out, "
            "projectors, or parameter-name prefixes. The VAE is always frozen."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the weights (keep float32 master weights and use --bf16 for mixed precision)."},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    lora: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Train LoRA adapters on these presets instead of the weights: {', '.join(lora_preset_names())}. "
            "trainable_modules is then ignored, and checkpoints / the output hold only the adapter (docs/lora.md)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha / r); default 2 * r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})


@dataclass
class DataArguments:
    """Training data and its preprocessing."""

    i2t_data: list[str] | None = field(
        default=None, metadata={"help": "Image-to-text (understanding) data sources (see docs/training.md)."}
    )
    t2i_data: list[str] | None = field(
        default=None, metadata={"help": "Text-to-image (generation) data sources (see docs/training.md)."}
    )
    image_size: int = field(default=256, metadata={"help": "Training resolution in pixels (256; 512 in stage 3)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column of datasets / image folders."})
    text_column: str | None = field(default=None, metadata={"help": "Text column of datasets / image folders."})
    data_split: str = field(default="train", metadata={"help": "Split of 🤗 datasets sources."})
    caption_prompts: str = field(
        default="dense",
        metadata={"help": "Questions for caption data: 'dense' or 'short'.", "choices": ["dense", "short"]},
    )
    unconditional_prob: float = field(
        default=0.1, metadata={"help": "Fraction of captions replaced by the unconditional prompt."}
    )
    i2t_max_length: int = field(default=512, metadata={"help": "Longest understanding sequence in tokens."})
    t2i_max_length: int = field(default=128, metadata={"help": "Longest generation prompt in tokens."})
    t2i_crop: str = field(
        default="random",
        metadata={
            "help": "Square crop of generation images: 'random' (upstream) or 'center'.",
            "choices": ["random", "center"],
        },
    )
    min_image_size: int = field(default=16, metadata={"help": "Skip images whose shorter side is below this."})
    max_aspect_ratio: float = field(default=10.0, metadata={"help": "Skip images more elongated than this."})
    latent_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache the VAE latents of the training images here, for both tasks (generation data needs "
            "t2i_crop=center); the training steps then skip the VAE encoder."
        },
    )


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, HarmonTrainingArguments]:
    """`[config.yaml] [--key value ...]` -> the three argument dataclasses (command-line values win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, HarmonTrainingArguments))
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_file, overrides = argv[0], argv[1:]
        if not overrides:
            return parser.parse_yaml_file(config_file)
        with open(config_file, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        known = {
            f.name for dc in (ModelArguments, DataArguments, HarmonTrainingArguments) for f in dataclasses.fields(dc)
        }
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown keys {unknown}.")
        parser.set_defaults(**config)
        return parser.parse_args_into_dataclasses(args=overrides)
    return parser.parse_args_into_dataclasses(args=argv)


def load_processor(path: str | os.PathLike) -> HarmonProcessor:
    """A saved `HarmonProcessor` folder (assembled by hand if the auto classes are not registered), or an LLM folder
    with tokenizer files (a processor is built from it later, once the model's sizes are known)."""
    path = Path(path)
    config_file = path / "processor_config.json"
    try:
        return HarmonProcessor.from_pretrained(path)
    except (ValueError, OSError, KeyError):
        if not config_file.is_file():
            raise
    config = json.loads(config_file.read_text())
    image_config = {k: v for k, v in config.get("image_processor", {}).items() if k != "image_processor_type"}
    chat_template_file = path / "chat_template.jinja"
    return HarmonProcessor(
        HarmonImageProcessor(**image_config),
        AutoTokenizer.from_pretrained(path),
        chat_template=chat_template_file.read_text() if chat_template_file.is_file() else None,
        **{
            k: config[k]
            for k in ("buffer_size", "padding_side", "generation_template", "unconditional_prompt")
            if k in config
        },
    )


def load_model_and_processor(
    model_args: ModelArguments, data_args: DataArguments
) -> tuple[HarmonForConditionalGeneration, HarmonProcessor]:
    """Load (or build) the model and its processor; the processor is set to the training resolution."""
    kwargs: dict[str, Any] = {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    dtype = getattr(torch, model_args.dtype)
    processor_path = model_args.processor_name_or_path
    if model_args.model_name_or_path:
        root = Path(model_args.model_name_or_path)
        is_pipeline = (root / "model_index.json").is_file() or (root / "model" / "config.json").is_file()
        subfolder = "model" if is_pipeline else ""
        config = HarmonConfig.from_pretrained(root, subfolder=subfolder, **kwargs)
        model = HarmonForConditionalGeneration.from_pretrained(root, subfolder=subfolder, config=config, dtype=dtype)
        if processor_path is None:
            processor_path = root / "processor" if is_pipeline else root
    elif model_args.model_config:
        if model_args.model_config not in NAMED_CONFIGS:
            raise ValueError(f"--model_config must be one of {NAMED_CONFIGS}, got {model_args.model_config!r}.")
        config = getattr(HarmonConfig, model_args.model_config)(**kwargs)
        model = HarmonForConditionalGeneration(config)
        if dtype != torch.float32:
            model.to(dtype)
            model.model.vae.float()  # the VAE stays float32 (as from_pretrained keeps it)
        if processor_path is None:
            raise ValueError("--model_config needs --processor_name_or_path (a processor or LLM tokenizer folder).")
    else:
        raise ValueError("Pass --model_name_or_path (a converted Harmon folder) or --model_config.")

    processor_path = Path(processor_path)
    if (processor_path / "processor_config.json").is_file():
        processor = load_processor(processor_path)
    else:  # an LLM folder: tokenizer files only
        processor = HarmonProcessor.from_llm_dir(
            processor_path, image_size=data_args.image_size, buffer_size=model.config.buffer_size
        )
    processor.image_processor.size = SizeDict(height=data_args.image_size, width=data_args.image_size)
    if processor.buffer_size != model.config.buffer_size or processor.image_token_id != model.config.image_token_id:
        raise ValueError(
            f"Processor (buffer {processor.buffer_size}, <image> id {processor.image_token_id}) does not fit the model "
            f"(buffer {model.config.buffer_size}, image_token_id {model.config.image_token_id})."
        )
    if data_args.image_size % model.config.image_stride:
        raise ValueError(f"--image_size must be a multiple of {model.config.image_stride}, got {data_args.image_size}.")
    return model, processor


def build_datasets(
    data_args: DataArguments, processor: HarmonProcessor, model: HarmonForConditionalGeneration, training_args: Any
) -> MixedTaskDataset:
    """The `MixedTaskDataset` of the configured sources (with the latent cache when asked)."""
    common = dict(
        image_processor=processor.image_processor,
        image_column=data_args.image_column,
        text_column=data_args.text_column,
        split=data_args.data_split,
        resolution=data_args.image_size,
        min_image_size=data_args.min_image_size,
        max_aspect_ratio=data_args.max_aspect_ratio,
    )
    i2t = build_task_dataset(data_args.i2t_data, IMAGE_TO_TEXT, caption_prompts=data_args.caption_prompts, **common)
    t2i = build_task_dataset(data_args.t2i_data, TEXT_TO_IMAGE, t2i_crop=data_args.t2i_crop, **common)
    if i2t is None and t2i is None:
        raise ValueError("No training data: pass --i2t_data and/or --t2i_data.")
    if data_args.latent_cache_dir:
        with training_args.main_process_first(desc="VAE latent cache"):
            vae = model.model.vae
            vae.to(training_args.device)
            batch = training_args.per_device_train_batch_size
            cached: list = []
            for ds in (t2i, i2t):  # understanding copies the tokens of pictures it shares with generation
                if ds is not None:
                    attach_latent_cache(model, ds, data_args.latent_cache_dir, batch_size=batch, reuse=cached)
                    cached.append(ds)
            vae.to("cpu")
    for name, ds in ((IMAGE_TO_TEXT, i2t), (TEXT_TO_IMAGE, t2i)):
        if ds is not None:
            logger.info(f"{name}: {len(ds)} examples from {len(ds.sources)} source(s)")
    return MixedTaskDataset({IMAGE_TO_TEXT: i2t, TEXT_TO_IMAGE: t2i})


def main(argv: list[str] | None = None, callbacks: list | None = None) -> HarmonTrainer:
    """Run training; returns the trainer (after saving the final model, or the LoRA adapter with `--lora`, and the
    processor in `output_dir`)."""
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    # Our own summaries (trainable parameters, data sizes) on the main process; broken-data warnings everywhere.
    for name in ("harmon_hf.train", "harmon_hf.training"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    model, processor = load_model_and_processor(model_args, data_args)
    train_dataset = build_datasets(data_args, processor, model, training_args)
    if model_args.lora:
        check_lora_presets_for_tasks(model_args.lora, train_dataset.tasks)
        # PEFT freezes every base weight; the Trainer then saves (and resumes) only the adapter.
        model = get_harmon_peft_model(
            model, model_args.lora, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout
        )
        counts = count_parameters(model)
        logger.info(
            f"LoRA {model_args.lora} (r={model_args.lora_r}): {counts['trainable']:,} adapter parameters, "
            f"{counts['frozen']:,} frozen (trainable_modules ignored)"
        )
    else:
        counts = set_trainable_modules(model, model_args.trainable_modules)
        logger.info(
            f"trainable {model_args.trainable_modules}: {counts['trainable']:,} of {counts['total']:,} parameters"
        )
    collator = HarmonDataCollator(
        processor,
        unconditional_prob=data_args.unconditional_prob,
        i2t_max_length=data_args.i2t_max_length,
        t2i_max_length=data_args.t2i_max_length,
    )
    trainer = HarmonTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
    )

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and str(checkpoint).lower() in ("true", "last", "auto"):
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is None:
            logger.info(f"No checkpoint in {training_args.output_dir}; starting from scratch.")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # model (or adapter) + processor in output_dir
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    return trainer


if __name__ == "__main__":
    main()
