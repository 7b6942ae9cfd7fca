#!/usr/bin/env python
"""Fine-tune Harmon with LoRA on your own image-caption folder, for generation and/or understanding.

The folder is the layout of 🤗 datasets' `imagefolder`: images plus a `metadata.jsonl` with one line per image,

    {"file_name": "0001.jpg", "text": "a watercolour painting of a lighthouse at dawn"}

(`metadata.csv` or another text column name, e.g. `caption`, work too). Then

    python examples/finetune_lora.py --model harmon-1.5b --data my_images/ --output_dir my-lora --steps 1000

trains adapters (default: the LLM's attention, the MAR decoder and the diffusion head for `--task generation`; the
LLM for `--task understanding`; every preset for `--task both`) and writes `my-lora/adapter_config.json` +
`adapter_model.safetensors` and the processor. Use them with

    pipe = HarmonPipeline.from_pretrained("harmon-1.5b")
    pipe.load_lora_weights("my-lora")

(see docs/lora.md). `--merge` also writes `my-lora/merged/`, a full model with the adapter merged in that
`HarmonPipeline.from_pretrained` loads directly. For multi-GPU runs, stage presets, resuming and every Trainer option
use `examples/train.py --lora ...` instead; this script is the short path.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers.image_utils import SizeDict

from harmon_hf import HarmonForConditionalGeneration, HarmonPipeline, HarmonProcessor
from harmon_hf.lora import check_lora_presets_for_tasks, get_harmon_peft_model, lora_preset_names
from harmon_hf.scheduling_harmon import HarmonDDPMScheduler
from harmon_hf.training import (
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    HarmonDataCollator,
    HarmonTrainer,
    HarmonTrainingArguments,
    MixedTaskDataset,
    build_task_dataset,
    count_parameters,
)

logger = logging.getLogger("harmon_hf.finetune_lora")

DEFAULT_PRESETS = {
    # drawing happens in the MAR decoder and the head; the LLM's attention carries the new words of the captions
    "generation": ["llm_attention", "mar_decoder", "diffusion_head"],
    "understanding": ["llm"],
    "both": ["all"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="converted Harmon folder (pipeline folder or model folder)")
    parser.add_argument("--data", required=True, nargs="+", help="image folder(s) with metadata.jsonl")
    parser.add_argument("--output_dir", required=True, help="where the adapter (and checkpoints) go")
    parser.add_argument("--task", default="generation", choices=sorted(DEFAULT_PRESETS), help="what to fine-tune")
    parser.add_argument(
        "--lora", nargs="+", default=None, help=f"LoRA presets (default by --task): {', '.join(lora_preset_names())}"
    )
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine schedule, 3%% warmup)")
    parser.add_argument("--image_size", type=int, default=None, help="training resolution (default: the model's)")
    parser.add_argument("--text_column", default=None, help="caption column of metadata.jsonl (default: guessed)")
    parser.add_argument(
        "--caption_prompts", default="short", choices=["short", "dense"], help="understanding questions"
    )
    parser.add_argument("--save_steps", type=int, default=500, help="checkpoint (adapter only) every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--merge", action="store_true", help="also save a merged full model in OUTPUT_DIR/merged")
    parser.add_argument("--sample_prompt", nargs="*", default=None, help="after training, draw these prompts")
    parser.add_argument("--sample_steps", type=int, default=64, help="MAR rounds for the samples")
    return parser.parse_args(argv)


def load_model_and_processor(path: str | Path) -> tuple[HarmonForConditionalGeneration, HarmonProcessor]:
    """A pipeline folder (`model/`, `processor/`) or a flat model folder with the processor files next to it."""
    root = Path(path)
    subfolder = "model" if (root / "model" / "config.json").is_file() else ""
    model = HarmonForConditionalGeneration.from_pretrained(root, subfolder=subfolder)
    processor = HarmonProcessor.from_pretrained(root / "processor" if subfolder else root)
    return model, processor


def main(argv: list[str] | None = None) -> Path:
    """Train the adapter; returns the output folder."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(args.seed)
    model, processor = load_model_and_processor(args.model)
    size = args.image_size or model.config.image_size
    if size % model.config.image_stride:
        raise ValueError(f"--image_size must be a multiple of {model.config.image_stride}, got {size}")
    # the processor expands each <image> into (size / 16)^2 placeholders: it must match the training resolution
    processor.image_processor.size = SizeDict(height=size, width=size)

    common = dict(image_processor=processor.image_processor, text_column=args.text_column, resolution=size)
    tasks = {"generation": [TEXT_TO_IMAGE], "understanding": [IMAGE_TO_TEXT], "both": [IMAGE_TO_TEXT, TEXT_TO_IMAGE]}
    datasets = {
        IMAGE_TO_TEXT: build_task_dataset(args.data, IMAGE_TO_TEXT, caption_prompts=args.caption_prompts, **common)
        if IMAGE_TO_TEXT in tasks[args.task]
        else None,
        TEXT_TO_IMAGE: build_task_dataset(args.data, TEXT_TO_IMAGE, **common)
        if TEXT_TO_IMAGE in tasks[args.task]
        else None,
    }
    train_dataset = MixedTaskDataset(datasets)

    presets = args.lora or DEFAULT_PRESETS[args.task]
    check_lora_presets_for_tasks(presets, train_dataset.tasks)
    peft_model = get_harmon_peft_model(model, presets, r=args.r, alpha=args.alpha, dropout=args.dropout)
    counts = count_parameters(peft_model)
    logger.info(f"LoRA {presets} r={args.r}: {counts['trainable']:,} trainable of {counts['total']:,} parameters")

    use_cpu = args.cpu or not torch.cuda.is_available()
    training_args = HarmonTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        warmup_steps=0.03,
        weight_decay=0.0,  # the adapters start at zero: decaying them only pulls back towards the base model
        logging_steps=max(1, min(10, args.steps // 10)),
        save_steps=args.save_steps,
        save_total_limit=2,
        bf16=not use_cpu and torch.cuda.is_bf16_supported(),
        use_cpu=use_cpu,
        # a 1:1 mix when both tasks train (generation data is the user's focus as often as understanding)
        task_ratio="image2text:1,text2image:1",
        seed=args.seed,
        report_to="none",
        dataloader_num_workers=0 if use_cpu else 4,
    )
    trainer = HarmonTrainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=HarmonDataCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model()  # adapter_config.json + adapter_model.safetensors + the processor
    out = Path(args.output_dir)
    logger.info(f"adapter saved in {out}")

    peft_model.eval()
    base = peft_model.get_base_model()  # the Harmon model, with the LoRA layers inside
    if args.sample_prompt and TEXT_TO_IMAGE in tasks[args.task]:
        pipe = HarmonPipeline(model=base, scheduler=HarmonDDPMScheduler(), processor=processor)
        (out / "samples").mkdir(exist_ok=True)
        for i, prompt in enumerate(args.sample_prompt):
            generator = torch.Generator().manual_seed(args.seed + i)
            image = pipe(
                prompt, height=size, width=size, num_inference_steps=args.sample_steps, generator=generator
            ).images[0]
            image.save(out / "samples" / f"{i:02d}.png")
        logger.info(f"samples in {out / 'samples'}")
    if args.merge:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        processor.save_pretrained(out / "merged")
        logger.info(f"merged model in {out / 'merged'} (HarmonPipeline.from_pretrained loads it)")
    return out


if __name__ == "__main__":
    main()
