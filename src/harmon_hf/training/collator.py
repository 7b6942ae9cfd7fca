"""`HarmonDataCollator`: training examples -> keyword arguments of `HarmonForConditionalGeneration.forward`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..processing_harmon import HarmonProcessor, _right_pad
from .data import IMAGE_TO_TEXT, TEXT_TO_IMAGE, as_generator

# Different stream from the dataset's use of the same per-example seed (crop offset, question).
_UNCONDITIONAL_SEED_OFFSET = 0x5DEECE66D


@dataclass
class HarmonDataCollator:
    """Batch Harmon training examples (one or both tasks per batch).

    Output keys (all tensors; only those of the tasks present):

    - image-to-text: `input_ids`, `attention_mask`, `labels` `(B, S)` (right-padded with `<|im_end|>`, labels -100
      except on the answers and their `<|im_end|>`) and `pixel_values` `(B, 3, H, W)` or `image_tokens`
      `(B, H/16, W/16, C)` when the examples come from a latent cache.
    - text-to-image: `generation_input_ids`, `generation_attention_mask` `(B', S')` ("Generate an image: {caption}"
      in the chat template, right-padded) and `generation_pixel_values` `(B', 3, H, W)` or `generation_image_tokens`
      `(B', H/16, W/16, C)` when the examples come from a latent cache.
    - `num_skipped_images`: broken examples replaced while building this batch (an int the trainer pops and logs).

    Args:
        processor: `HarmonProcessor` (tokenizer, chat template, placeholder count of its image size).
        unconditional_prob: probability that a caption is replaced by the unconditional prompt "Generate an image."
            (upstream 0.1; classifier-free guidance needs it).
        generator: source of the unconditional draws. None: each example's own `seed` (from the sampler) decides,
            which keeps resumed runs identical; without a seed torch's global generator is used.
        i2t_max_length: truncation of understanding sequences (upstream 512).
        t2i_max_length: longest generation prompt in tokens (upstream 128); longer captions are shortened so that the
            chat template stays intact.
    """

    processor: HarmonProcessor
    unconditional_prob: float = 0.1
    generator: torch.Generator | None = None
    i2t_max_length: int | None = 512
    t2i_max_length: int | None = 128
    _rows: dict[tuple, list[int]] = field(default_factory=dict, init=False, repr=False)  # see `_prompt_row`

    def __post_init__(self) -> None:
        if not 0.0 <= self.unconditional_prob <= 1.0:
            raise ValueError(f"unconditional_prob must lie in [0, 1], got {self.unconditional_prob}.")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("HarmonDataCollator got an empty batch.")
        unknown = {ex.get("task") for ex in examples} - {IMAGE_TO_TEXT, TEXT_TO_IMAGE}
        if unknown:
            raise ValueError(f"Examples must have task {IMAGE_TO_TEXT!r} or {TEXT_TO_IMAGE!r}, got {sorted(unknown)}.")
        batch: dict[str, Any] = {}
        understanding = [ex for ex in examples if ex["task"] == IMAGE_TO_TEXT]
        generation = [ex for ex in examples if ex["task"] == TEXT_TO_IMAGE]
        if understanding:
            batch.update(self.collate_image_to_text(understanding))
        if generation:
            batch.update(self.collate_text_to_image(generation))
        batch["num_skipped_images"] = int(sum(int(ex.get("num_skipped", 0)) for ex in examples))
        return batch

    # ----- image -> text ---------------------------------------------------------------------------------------
    def collate_image_to_text(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Conversations + preprocessed images -> `input_ids`, `attention_mask`, `labels` `(B, S)`, `pixel_values`
        `(B, 3, S, S)` (or `image_tokens` `(B, S/16, S/16, C)` when the examples come from a latent cache)."""
        size = self.processor.image_size
        has_tokens = ["image_tokens" in ex for ex in examples]
        if all(has_tokens):
            images = {"image_tokens": torch.stack([torch.as_tensor(ex["image_tokens"]) for ex in examples])}
            found = tuple(images["image_tokens"].shape[1:3])
            expected = (size // int(self.processor.image_processor.image_stride),) * 2
        elif not any(has_tokens):
            images = {"pixel_values": torch.stack([torch.as_tensor(ex["pixel_values"]) for ex in examples])}
            found, expected = tuple(images["pixel_values"].shape[-2:]), (size, size)
        else:
            raise ValueError("An image-to-text batch mixes cached latents and pixels; cache all examples or none.")
        if found != expected:
            what = "latent grids" if "image_tokens" in images else "images"
            raise ValueError(
                f"Understanding {what} are {found} but the processor expands <image> for {size}x{size} pixels "
                f"({expected}); use the same resolution for the dataset and the processor."
            )
        text = self.processor.build_i2t_training_batch(
            [ex["conversation"] for ex in examples], max_length=self.i2t_max_length, return_tensors="pt"
        )
        return {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": text["labels"],
            **images,
        }

    # ----- text -> image ---------------------------------------------------------------------------------------
    def drop_captions(self, examples: Sequence[dict[str, Any]]) -> list[str | None]:
        """The captions with the unconditional replacement applied (None = unconditional prompt)."""
        prompts: list[str | None] = []
        for ex in examples:
            if self.unconditional_prob <= 0.0:
                drop = False
            elif self.generator is not None or ex.get("seed") is None:
                drop = torch.rand((), generator=self.generator).item() < self.unconditional_prob
            else:
                g = as_generator(int(ex["seed"]) + _UNCONDITIONAL_SEED_OFFSET)
                drop = torch.rand((), generator=g).item() < self.unconditional_prob
            prompts.append(None if drop else ex["caption"])
        return prompts

    def collate_text_to_image(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Captions + target images -> `generation_input_ids`, `generation_attention_mask`, and
        `generation_pixel_values` `(B, 3, H, W)` or `generation_image_tokens` `(B, m, n, C)`."""
        rows = [self._prompt_row(p) for p in self.drop_captions(examples)]
        input_ids, attention_mask = _right_pad(rows, self.processor._pad_id())
        batch = {
            "generation_input_ids": torch.tensor(input_ids, dtype=torch.long),
            "generation_attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }
        has_tokens = ["image_tokens" in ex for ex in examples]
        if all(has_tokens):
            batch["generation_image_tokens"] = torch.stack([torch.as_tensor(ex["image_tokens"]) for ex in examples])
        elif not any(has_tokens):
            batch["generation_pixel_values"] = torch.stack([torch.as_tensor(ex["pixel_values"]) for ex in examples])
        else:
            raise ValueError("A text-to-image batch mixes cached latents and pixels; cache all examples or none.")
        return batch

    def _prompt_row(self, caption: str | None) -> list[int]:
        """Token ids of one generation prompt (`HarmonProcessor.build_t2i_prompts`, after `_truncate`), kept per
        caption: a training run collates the same captions many times, and rendering the chat template and
        tokenizing were most of the time of a text-to-image collate."""
        p = self.processor
        key = (caption, p.chat_template, p.generation_template, p.unconditional_prompt)
        row = self._rows.get(key)
        if row is None:
            row = p.build_t2i_prompts([self._truncate(caption)], add_unconditional=False, return_tensors=None)
            row = row["input_ids"][0]
            if len(self._rows) >= 65536:  # bounded: captions of large datasets rarely repeat
                self._rows.clear()
            self._rows[key] = row
        return list(row)

    def _truncate(self, caption: str | None) -> str | None:
        """Shorten a caption so that its whole prompt fits in `t2i_max_length` tokens."""
        if caption is None or self.t2i_max_length is None:
            return caption
        if getattr(self, "_prompt_overhead", None) is None:
            empty = self.processor.build_t2i_prompts([""], add_unconditional=False, return_tensors=None)
            self._prompt_overhead = len(empty["input_ids"][0])
        limit = self.t2i_max_length - self._prompt_overhead
        if limit <= 0:
            raise ValueError(f"t2i_max_length={self.t2i_max_length} leaves no room for a caption.")
        tokenizer = self.processor.tokenizer
        original = ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        keep = limit
        while len(ids) > limit:  # decoding and re-encoding may merge differently: cut until it fits
            caption = tokenizer.decode(original[:keep]).strip()
            ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
            keep -= 1
        return caption


__all__ = ["HarmonDataCollator"]
