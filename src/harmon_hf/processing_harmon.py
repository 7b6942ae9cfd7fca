"""Processor for Harmon: the Qwen2.5 tokenizer with an `<image>` token + `HarmonImageProcessor`.

Prompt layouts (upstream Harmon, no system turn unless the messages contain one, no BOS):

- understanding: `<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`, where each `<image>`
  marker becomes `(size / 16)^2 + buffer_size` `<image>` tokens (the image features: image tokens, then the MAR
  buffer slots).
- text-to-image: the same user turn around `Generate an image: {prompt}`; the unconditional (CFG) prompt is
  `Generate an image.` (`HarmonProcessor.build_t2i_prompts`).
- image-to-text training: the conversation rendered by the chat template, the assistant answers and their
  `<|im_end|>` supervised, everything else (prompt, image tokens, the "\\n" after each answer, padding) labelled
  -100 (`HarmonProcessor.build_i2t_training_batch`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, PreTrainedTokenizerBase, TextInput
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_harmon import HarmonImageProcessor

__all__ = ["HARMON_CHAT_TEMPLATE", "HarmonProcessor", "HarmonProcessorKwargs", "prepare_tokenizer"]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

# Qwen2.5 ChatML without the default system turn. String content is used as is; list content joins its items with
# "\n", an {"type": "image"} item rendering as one <image> marker. Assistant answers (with their <|im_end|>) sit in
# {% generation %} blocks, which is what the training labels supervise.
HARMON_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(parts=[]) -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.parts = ns.parts + ['<image>'] -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.parts = ns.parts + [item['text']] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.parts | join('\\n') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

Conversation = list[dict[str, Any]]


def prepare_tokenizer(
    llm_dir_or_tokenizer: str | os.PathLike | PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """Load the LLM tokenizer and add the `<image>` token as upstream Harmon does.

    `<image>` becomes an additional special token (never split, `special=True`), so it gets id `len(tokenizer)`
    (151665 for Qwen2.5, 500 for the tiny fixture tokenizer), and is registered as the named token `image_token`
    (transformers 5 `extra_special_tokens` mechanism): `tokenizer.image_token` / `tokenizer.image_token_id` work and
    survive `save_pretrained`. Nothing changes if the token is already there.

    Args:
        llm_dir_or_tokenizer: a local directory / Hub id (loaded with `AutoTokenizer`), or a loaded tokenizer
            (modified in place and returned).
        image_token: the placeholder string.
        kwargs: passed to `AutoTokenizer.from_pretrained`.
    """
    if isinstance(llm_dir_or_tokenizer, PreTrainedTokenizerBase):
        tokenizer = llm_dir_or_tokenizer
        if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
            token = AddedToken(image_token, rstrip=False, lstrip=False, normalized=False, special=True)
            tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
    else:
        extra = dict(kwargs.pop("extra_special_tokens", None) or {})
        extra.setdefault("image_token", image_token)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir_or_tokenizer, extra_special_tokens=extra, **kwargs)
    if getattr(tokenizer, "image_token", None) != image_token:
        # Register the named attribute (`tokenizer.image_token(_id)`), saved as "image_token" in tokenizer_config.json.
        tokenizer._set_model_specific_special_tokens({"image_token": image_token})
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"Could not add {image_token!r} to the tokenizer.")
    return tokenizer


class HarmonProcessorKwargs(ProcessingKwargs, total=False):
    pass


class HarmonProcessor(ProcessorMixin):
    r"""
    Harmon processor: `HarmonImageProcessor` + the LLM tokenizer (with `<image>`), a ChatML chat template without
    default system turn, and the prompt builders shared by the pipeline and training.

    Args:
        image_processor (`HarmonImageProcessor`): pads, resizes and scales images.
        tokenizer (`PreTrainedTokenizerBase`): the Qwen2.5 tokenizer with `<image>` (see `prepare_tokenizer`).
        chat_template (`str`, *optional*): Jinja chat template; defaults to `HARMON_CHAT_TEMPLATE`.
        buffer_size (`int`, defaults to 64): MAR buffer slots appended to every image's features (8 in the tiny
            fixture model).
        padding_side (`str`, defaults to "left"): padding side of `__call__` batches (generation); the t2i prompts and
            training batches are always right-padded, as upstream.
        generation_template (`str`, defaults to "Generate an image: {prompt}"): user text of a text-to-image prompt.
        unconditional_prompt (`str`, defaults to "Generate an image."): user text of the unconditional (CFG) prompt.

    Example:

    ```python
    >>> processor = HarmonProcessor.from_llm_dir("Qwen2.5-1.5B-Instruct", image_size=512)
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> inputs = processor(images=image, text=prompt)  # input_ids (1, S), attention_mask, pixel_values (1, 3, 512, 512)
    ```
    """

    valid_processor_kwargs = HarmonProcessorKwargs
    text_kwargs = {"padding": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(
        self,
        image_processor: HarmonImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        buffer_size: int = 64,
        padding_side: str = "left",
        generation_template: str = "Generate an image: {prompt}",
        unconditional_prompt: str = "Generate an image.",
    ):
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if "{prompt}" not in generation_template:
            raise ValueError(f"generation_template must contain '{{prompt}}', got {generation_template!r}.")
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {self.image_token!r} token; load it with `prepare_tokenizer(llm_dir)`."
            )
        self.buffer_size = buffer_size
        self.padding_side = padding_side
        self.generation_template = generation_template
        self.unconditional_prompt = unconditional_prompt
        super().__init__(image_processor, tokenizer, chat_template=chat_template or HARMON_CHAT_TEMPLATE)

    @classmethod
    def from_llm_dir(
        cls,
        llm_dir: str | os.PathLike,
        image_size: int | None = 256,
        buffer_size: int | None = 64,
        chat_template: str | None = None,
        **tokenizer_kwargs: Any,
    ) -> HarmonProcessor:
        """Build the processor from an LLM directory (Qwen2.5-Instruct download: tokenizer files), as the converter
        does: `<image>` added (`prepare_tokenizer`), the Harmon chat template set on the tokenizer too, and an image
        processor at `image_size`. `None` for `image_size` / `buffer_size` means the defaults (256 / 64)."""
        tokenizer = prepare_tokenizer(llm_dir, **tokenizer_kwargs)
        template = chat_template or HARMON_CHAT_TEMPLATE
        tokenizer.chat_template = template
        return cls(
            HarmonImageProcessor(size=256 if image_size is None else image_size),
            tokenizer,
            chat_template=template,
            buffer_size=64 if buffer_size is None else buffer_size,
        )

    # ------------------------------------------------------------------------------------------------------------
    # image placeholders
    # ------------------------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Side of the processed images (from the image processor's `size`)."""
        return int(self.image_processor.size.height)

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Number of `<image>` tokens for one image of `height` x `width` pixels (default: the processor size):
        `(height / stride) * (width / stride) + buffer_size`."""
        stride = int(self.image_processor.image_stride)
        height = self.image_size if height is None else height
        width = height if width is None else width
        return (height // stride) * (width // stride) + self.buffer_size

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
        return self.image_token * self.num_image_tokens(int(height), int(width))

    def _process_images(self, images: ImageInput, **kwargs: Any) -> tuple[dict, list[str]]:
        processed = self.image_processor(images, **kwargs)
        replacements = [self.replace_image_token(processed, image_idx=i) for i in range(len(processed["pixel_values"]))]
        return processed, replacements

    def _count_images(self, images: Any) -> int:
        if isinstance(images, (list, tuple)) and len(images) == 0:
            return 0
        return len(self.image_processor.flatten_images(images))

    def validate_inputs(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> None:
        """Check the inputs: text is a string or list of strings, and the `<image>` markers match the images
        (in total, and per sample when the images are given as one list per sample)."""
        if videos is not None or audio is not None:
            raise ValueError("HarmonProcessor handles text and images only (no videos or audio).")
        if images is None and text is None:
            raise ValueError("HarmonProcessor needs `text`, `images` or both.")
        if text is None:
            return
        samples = [text] if isinstance(text, str) else text
        if not isinstance(samples, (list, tuple)) or not all(isinstance(s, str) for s in samples):
            raise TypeError("`text` must be a string or a list of strings.")
        counts = [s.count(self.image_token) for s in samples]
        if images is None:
            if sum(counts):
                raise ValueError(
                    f"Found {sum(counts)} {self.image_token} marker(s) in the text but no images were passed."
                )
            return
        n_images = self._count_images(images)
        if n_images != sum(counts):
            raise ValueError(
                f"The text has {sum(counts)} {self.image_token} marker(s) but {n_images} image(s) were passed; each "
                f"image needs exactly one {self.image_token} marker (the processor expands it)."
            )
        if (
            isinstance(images, (list, tuple))
            and len(images) == len(samples) > 1
            and all(isinstance(group, (list, tuple)) for group in images)
        ):
            per_sample = [self._count_images(group) for group in images]
            if per_sample != counts:
                raise ValueError(
                    f"Images per sample {per_sample} do not match the {self.image_token} markers per sample {counts}."
                )

    # ------------------------------------------------------------------------------------------------------------
    # main call
    # ------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        **kwargs: Unpack[HarmonProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize prompts (each `<image>` marker expanded to `num_image_tokens()` tokens) and preprocess images.

        Returns a `BatchFeature` with `input_ids` and `attention_mask` `(batch, seq)` (left-padded by default) and
        `pixel_values` `(num_images, 3, size, size)` in [-1, 1] (images in the order of their markers).
        """
        text_kwargs = kwargs.get("text_kwargs") or {}
        if "padding_side" not in kwargs and "padding_side" not in text_kwargs:
            # The tokenizer's own (saved) padding side would otherwise win over the processor default.
            kwargs["padding_side"] = self.padding_side
        return super().__call__(images=images, text=text, **kwargs)

    def apply_chat_template(self, conversation: Conversation | list[Conversation], *args: Any, **kwargs: Any) -> Any:
        """`ProcessorMixin.apply_chat_template` after validating the conversation(s) (non-empty lists of
        `{"role": str, "content": str | list of {"type": "text"|"image", ...}}`)."""
        for conv in _as_conversation_batch(conversation):
            _validate_conversation(conv)
        return super().apply_chat_template(conversation, *args, **kwargs)

    def postprocess(self, images: torch.Tensor | np.ndarray, output_type: str = "pil") -> Any:
        """Generated images in [-1, 1] -> "pil" / "np" / "pt" / "uint8" (`HarmonImageProcessor.postprocess`)."""
        return self.image_processor.postprocess(images, output_type=output_type)

    # ------------------------------------------------------------------------------------------------------------
    # text-to-image prompts (pipeline and training)
    # ------------------------------------------------------------------------------------------------------------
    def build_t2i_prompts(
        self,
        prompts: str | Sequence[str | None],
        negative_prompt: str | Sequence[str | None] | None = None,
        num_images_per_prompt: int = 1,
        add_unconditional: bool = True,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Token ids of text-to-image prompts, right-padded with the `<|im_end|>` id (as upstream).

        Each prompt `p` becomes the user turn `generation_template.format(prompt=p)` ("Generate an image: {p}") with
        the assistant header; a `None` prompt is the unconditional prompt (training drops captions this way).
        With `add_unconditional` (classifier-free guidance) the batch is `[conditional rows..., unconditional
        rows...]`, one unconditional row per conditional row: `unconditional_prompt` ("Generate an image.") or, for
        a negative prompt `n`, `generation_template.format(prompt=n)`, i.e. the negative text in the same template
        as a caption, so that guidance moves away from it.

        Args:
            prompts: one prompt or a list (entries may be `None`).
            negative_prompt: `None`, one string for all prompts, or one per prompt (`None` entries: unconditional).
            num_images_per_prompt: rows per prompt (consecutive), for both halves.
            add_unconditional: append the unconditional half.
            return_tensors: "pt", "np" or None (lists).

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask`, `(rows, seq)`; rows = len(prompts) *
            num_images_per_prompt * (2 if add_unconditional else 1).
        """
        if isinstance(prompts, str) or prompts is None:
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("build_t2i_prompts got no prompt.")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")
        texts = [self._t2i_text(p) for p in prompts for _ in range(num_images_per_prompt)]
        if add_unconditional:
            if negative_prompt is None or isinstance(negative_prompt, str):
                negatives = [negative_prompt] * len(prompts)
            else:
                negatives = list(negative_prompt)
                if len(negatives) != len(prompts):
                    raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts.")
            texts += [self._t2i_text(n) for n in negatives for _ in range(num_images_per_prompt)]
        rows = [self._encode(self._render([{"role": "user", "content": t}], add_generation_prompt=True)) for t in texts]
        input_ids, attention_mask = _right_pad(rows, self._pad_id())
        return BatchFeature({"input_ids": input_ids, "attention_mask": attention_mask}, tensor_type=return_tensors)

    def _t2i_text(self, prompt: str | None) -> str:
        if prompt is None:
            return self.unconditional_prompt
        if not isinstance(prompt, str):
            raise TypeError(f"Prompts must be strings (or None), got {type(prompt).__name__}.")
        if self.image_token in prompt:
            raise ValueError(f"Text-to-image prompts cannot contain the {self.image_token} marker: {prompt!r}.")
        return self.generation_template.format(prompt=prompt)

    # ------------------------------------------------------------------------------------------------------------
    # image-to-text training examples
    # ------------------------------------------------------------------------------------------------------------
    def build_i2t_training_batch(
        self,
        conversations: Conversation | Sequence[Conversation],
        images: ImageInput | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Image-to-text training batch (upstream caption/VQA layout), right-padded with the `<|im_end|>` id.

        Every conversation is rendered with the chat template; the text is tokenized piece by piece (prompt parts
        and each assistant answer + `<|im_end|>` separately, as upstream's data pipeline does), then each `<image>`
        token is expanded to `num_image_tokens()` tokens. Labels are the ids of the assistant answers and their
        `<|im_end|>` (the chat template's `{% generation %}` blocks) and -100 everywhere else: prompt, image tokens,
        the "\\n" after each answer, padding.

        Args:
            conversations: one conversation or a list; a conversation is a list of messages
                `{"role": ..., "content": str | [{"type": "image"}, {"type": "text", "text": ...}]}` with at least one
                assistant message. The upstream caption example is
                `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": caption}]`.
            images: the images of all `<image>` markers in order (flat, or one list per conversation), or None to
                only build the ids (the image size is then the processor's).
            max_length: truncate longer sequences on the right (an error if that would cut or drop image tokens).
            return_tensors: "pt", "np" or None.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `labels` `(batch, seq)` and, with images,
            `pixel_values` `(num_images, 3, size, size)`.
        """
        batch = _as_conversation_batch(conversations)
        for conv in batch:
            _validate_conversation(conv)
        n_markers = 0
        rendered, spans = render_jinja_template(
            conversations=batch,
            chat_template=self._resolve_chat_template(None),
            return_assistant_tokens_mask=True,
            add_generation_prompt=False,
            **self.tokenizer.special_tokens_map,
        )
        pixel_values, sizes = None, []
        if images is not None:
            processed = self.image_processor(images, return_tensors=return_tensors)
            pixel_values = processed["pixel_values"]
            sizes = [tuple(int(d) for d in pv.shape[-2:]) for pv in pixel_values]
        rows_ids, rows_labels = [], []
        for text, text_spans in zip(rendered, spans):
            if not text_spans:
                raise ValueError("A training conversation needs at least one assistant message to supervise.")
            ids, labels = [], []
            cursor = 0
            for start, end in text_spans:
                for piece, supervised in ((text[cursor:start], False), (text[start:end], True)):
                    piece_ids = self._encode(piece) if piece else []
                    if supervised and self.image_token_id in piece_ids:
                        raise ValueError(f"Assistant messages cannot contain {self.image_token} markers.")
                    ids += piece_ids
                    labels += piece_ids if supervised else [-100] * len(piece_ids)
                cursor = end
            tail = self._encode(text[cursor:]) if text[cursor:] else []
            ids += tail
            labels += [-100] * len(tail)
            expanded_ids, expanded_labels, blocks = [], [], []
            for token, label in zip(ids, labels):
                if token == self.image_token_id:
                    if images is not None:
                        if n_markers >= len(sizes):
                            raise ValueError(
                                f"The conversations have more {self.image_token} markers than the {len(sizes)} "
                                "image(s) passed."
                            )
                        count = self.num_image_tokens(*sizes[n_markers])
                    else:
                        count = self.num_image_tokens()
                    n_markers += 1
                    blocks.append((len(expanded_ids), len(expanded_ids) + count))
                    expanded_ids += [token] * count
                    expanded_labels += [-100] * count
                else:
                    expanded_ids.append(token)
                    expanded_labels.append(label)
            if max_length is not None and len(expanded_ids) > max_length:
                if any(end > max_length for _, end in blocks):
                    raise ValueError(
                        f"max_length={max_length} would cut or drop the image tokens of a training example "
                        f"(length {len(expanded_ids)})."
                    )
                expanded_ids, expanded_labels = expanded_ids[:max_length], expanded_labels[:max_length]
                if all(label == -100 for label in expanded_labels):
                    logger.warning(
                        "A training example has no supervised token left after truncation to %d.", max_length
                    )
            rows_ids.append(expanded_ids)
            rows_labels.append(expanded_labels)
        if images is not None and n_markers != len(sizes):
            raise ValueError(
                f"The conversations have {n_markers} {self.image_token} marker(s) but {len(sizes)} image(s) "
                "were passed."
            )
        pad_id = self._pad_id()
        input_ids, attention_mask = _right_pad(rows_ids, pad_id)
        labels, _ = _right_pad(rows_labels, -100)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------
    def _render(self, conversation: Conversation, add_generation_prompt: bool) -> str:
        return self.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.eos_token_id
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has neither an eos nor a pad token to pad prompts with.")
        return int(pad_id)


def _as_conversation_batch(conversation: Any) -> list[Conversation]:
    if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
        raise ValueError("The conversation is empty: pass a non-empty list of messages (or a list of them).")
    if isinstance(conversation[0], (list, tuple)):
        return [list(c) for c in conversation]
    return [list(conversation)]


def _validate_conversation(conversation: Any) -> None:
    if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
        raise ValueError("The conversation is empty: pass a non-empty list of messages.")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise ValueError(f"Message {i} must be a dict with a string 'role' and a 'content'; got {message!r}.")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"Message {i}: content must be a string or a list of items, got {type(content).__name__}.")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in ("text", "image"):
                raise ValueError(
                    f"Message {i}: content items must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}; "
                    f"got {item!r}."
                )
            if kind == "text" and not isinstance(item.get("text"), str):
                raise ValueError(f"Message {i}: a text item needs a string 'text', got {item!r}.")


def _right_pad(rows: list[list[int]], pad_value: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad integer rows to the longest one -> (padded rows, attention mask)."""
    length = max(len(r) for r in rows)
    padded = [r + [pad_value] * (length - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (length - len(r)) for r in rows]
    return padded, mask
