"""A tiny byte-level BPE tokenizer for Harmon-Shapes, with Qwen2.5 conventions.

Trained (🤗 `tokenizers`) on everything the shapes model reads or writes: captions of every scene type, the
questions and answers, Harmon's prompt pieces ("Generate an image: ...") and the chat-template pieces. Like Qwen2.5
it splits text with Qwen's regex before byte-level BPE, has no BOS, ends turns with `<|im_end|>` (the eos token)
and pads with `<|endoftext|>`; the three special tokens are the LAST ids (`<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`), so Harmon's `<image>` (added later by the processor) gets id `len(tokenizer)`. Being byte-level, it
encodes any text; words outside the shapes vocabulary just take more tokens.

`build_tokenizer()` returns a transformers tokenizer; `save_tokenizer(dir)` writes `tokenizer.json`,
`tokenizer_config.json` and `chat_template.jinja`, loadable with `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .data import NUMBER_WORDS, RELATIONS, ObjectSpec, PromptSpec, ShapesWorld, make_qa, place

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tokenizer", "save_tokenizer", "training_corpus"]

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2's pre-tokenizer split (contractions, letters with one leading non-letter, single digits, punctuation runs,
# newlines, spaces).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-style ChatML: a default system turn when the messages have none; string content, or a list of
# {"type": "text"} items joined by newlines.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set rest = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}"
    "{%- for message in rest -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Generic instructions a user (or the training code's caption prompts) may send.
_GENERIC_TEXT = (
    "Generate an image.",
    "Generate an image: ",
    "Describe the image.",
    "Describe the image briefly.",
    "Describe the image in detail.",
    "What is in the picture?",
    "What does this image show?",
    "Give a short caption for this image.",
    "Caption this image.",
    "Write a brief description of the image.",
    "Summarize the picture in one sentence.",
    "The image shows a shape on a white background.",
    "Yes. No. I don't know.",
    "user",
    "assistant",
    "system",
    DEFAULT_SYSTEM,
)


def training_corpus(world: ShapesWorld | None = None, repeats: int = 2) -> Iterator[str]:
    """Text the BPE merges are learnt from: every caption form, every question template, answers and prompts."""
    world = world or ShapesWorld()
    objects = world.combos()
    for _ in range(repeats):
        yield from _GENERIC_TEXT
        yield "\n".join(f"<|im_start|>{role}\n" for role in ("system", "user", "assistant"))
        for obj in objects:
            yield PromptSpec("single", (obj,)).caption()
            yield f"Generate an image: {PromptSpec('single', (obj,)).caption()}"
            for count in range(1, world.max_count + 1):
                yield PromptSpec("count", (obj,), count=count).caption()
            for other in objects:
                for relation in RELATIONS:
                    if other != obj:
                        yield PromptSpec("pair", (obj, other), relation=relation).caption()
        for word in (*world.colours, *world.shapes, *RELATIONS, "top", "bottom", *NUMBER_WORDS):
            yield word
            yield f" {word}"
        # The question templates, through the generator itself (every phrasing appears over a few seeds).
        rng = random.Random(0)
        for obj in objects:
            for other in objects:
                for relation in RELATIONS:
                    if obj == other:
                        continue
                    spec = PromptSpec("pair", (obj, other), relation=relation)
                    for question, answer, _ in make_qa(spec, place(spec, rng), rng):
                        yield f"{question}\n{answer}"
            for kind, count in (("single", 1), ("count", 2), ("count", 3)):
                spec = PromptSpec(kind, (ObjectSpec(obj.colour, obj.shape),), count=count)
                for question, answer, _ in make_qa(spec, place(spec, rng), rng):
                    yield f"{question}\n{answer}"


def build_tokenizer(vocab_size: int = 500, world: ShapesWorld | None = None) -> PreTrainedTokenizerFast:
    """Train the BPE and wrap it as a transformers tokenizer.

    Args:
        vocab_size: total size including the three special tokens (the corpus may end merging earlier).
        world: the world whose words are learnt.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(training_corpus(world), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # appended: the last ids, as in Qwen2.5
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def save_tokenizer(out_dir: str | Path, vocab_size: int = 500, world: ShapesWorld | None = None) -> Path:
    """Build the tokenizer and `save_pretrained` it (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    out = Path(out_dir)
    build_tokenizer(vocab_size, world).save_pretrained(out)
    return out
