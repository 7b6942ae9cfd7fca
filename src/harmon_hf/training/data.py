"""Training data for Harmon: image-text sources, per-task datasets and the mixed-task dataset.

Two tasks read the same kind of data, (image, text) pairs:

- `text2image` (generation): the text is a caption; the image is randomly cropped to a square (upstream
  `crop2square`), resized and scaled to [-1, 1]. The collator turns the caption into the "Generate an image: ..."
  prompt (10% become the unconditional "Generate an image.").
- `image2text` (understanding): the image is padded to a grey square and resized (the processor's understanding
  preprocessing); the text becomes the answer of a one-turn conversation whose question is drawn from a caption
  prompt list ("Describe the image.", ...), or the example carries a whole LLaVA-style conversation.

Accepted sources (`load_source`; see docs/training.md for examples):

1. The upstream layout, described by a `data_info.json` file (or a folder holding one)::

       {"annotations": "captions.json",      # a JSON list file, or a folder of JSON list files
        "image_folder": "images",            # root of each entry's "image" path
        "caption_folder": "captions",        # root of each entry's "annotation" path (default: image_folder)
        "caption_key": "caption"}            # caption field (default "caption")

   Upstream's names `data_path`, `local_folder`, `cap_folder`, `cap_source` are accepted as aliases, relative paths
   are resolved against the folder of `data_info.json`, and `{"datasets": [{...}, {...}]}` lists several. Each list
   entry is one of `{"image": "a.jpg", "annotation": "a.json"}` (caption = `caption_key` of that JSON file),
   `{"image": "a.jpg", "<caption_key>": "text"}` (a list of strings picks one at random), or LLaVA's
   `{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}`.
   A bare JSON list file, or a folder of JSON list files without `data_info.json`, is read the same way with the
   images and captions relative to that file's folder.
2. An image folder with `metadata.jsonl` (or `metadata.csv`) holding a `file_name` column and a text column, as
   🤗 datasets' `imagefolder` builder expects (read directly, without the `datasets` package).
3. Any 🤗 `datasets` dataset: a `datasets.Dataset` object, a `save_to_disk` folder, or a name / path that
   `datasets.load_dataset` understands (needs `pip install datasets`). The image column may hold PIL images,
   `{"bytes", "path"}` dicts or paths; the text column strings (or lists of strings).

Broken examples (missing or undecodable image, image smaller than `min_image_size` or more elongated than
`max_aspect_ratio`, empty caption) never stop training: a warning names the example and the reason, and a
deterministic substitute from the same task is used instead. Each example reports how many it replaced
(`num_skipped`); the collator sums them and the trainer logs the running total as `skipped_images`.
"""

from __future__ import annotations

import bisect
import csv
import glob
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch.utils.data import Dataset

from ..image_processing_harmon import HarmonImageProcessor, load_image_file

logger = logging.getLogger(__name__)

TEXT_TO_IMAGE = "text2image"
IMAGE_TO_TEXT = "image2text"
TASKS = (IMAGE_TO_TEXT, TEXT_TO_IMAGE)

# Questions for captioning examples (one is drawn per example). Short prompts ask for a brief caption, the dense
# ones for a detailed description; upstream used the dense kind for its caption data.
SHORT_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "Describe the image briefly.",
    "What is in the picture?",
    "Give a short caption for this image.",
    "Summarize the picture in one sentence.",
    "What does this image show?",
    "Write a brief description of the image.",
    "Caption this image.",
)
DENSE_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "Describe everything you can see in the image.",
    "What is in the picture? Answer in detail.",
    "Write a thorough description of the scene in this image.",
    "Explain the contents of the image, including objects, colours and layout.",
    "Provide a comprehensive caption for this image.",
)
CAPTION_PROMPTS = {"short": SHORT_CAPTION_PROMPTS, "dense": DENSE_CAPTION_PROMPTS}

_IMAGE_COLUMNS = ("image", "img", "file_name", "image_path", "path", "jpg", "png")
_TEXT_COLUMNS = ("text", "caption", "prompt", "description", "captions", "txt")
_UPSTREAM_ALIASES = {
    "data_path": "annotations",
    "local_folder": "image_folder",
    "cap_folder": "caption_folder",
    "cap_source": "caption_key",
}


class BrokenExampleError(ValueError):
    """An example that cannot be used (bad image or caption); the dataset replaces it and counts it."""


# ------------------------------------------------------------------------------------------------------------------
# records and sources
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ImageTextRecord:
    """One raw example of a source, before loading.

    Attributes:
        image: a path (str / PathLike), a PIL image, encoded bytes, or a `{"bytes": ..., "path": ...}` dict.
        text: the caption, a list of captions (one is drawn), or None when it lives in `annotation`.
        annotation: path of a JSON file whose `caption_key` field holds the caption (upstream large datasets).
        caption_key: see `annotation`.
        conversation: LLaVA-style turns `[{"from": "human"|"gpt", "value": str}, ...]` for understanding data.
        name: a short description used in warnings.
    """

    image: Any
    text: str | list[str] | None = None
    annotation: str | None = None
    caption_key: str = "caption"
    conversation: list[dict[str, str]] | None = None
    name: str = ""


class ImageTextSource:
    """A sized, indexable collection of `ImageTextRecord`s (one data source)."""

    name: str = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int) -> ImageTextRecord:
        """The raw record at `index` (reading it may fail; the dataset then skips the example)."""
        raise NotImplementedError

    def text_lengths(self) -> list[int]:
        """Characters of text in each record (all conversation turns, or the longest caption; 0 when unknown): a
        cheap stand-in for the token length, used to group batches by length (`train_sampling_strategy`)."""
        lengths = []
        for index in range(len(self)):
            try:
                lengths.append(_text_length(self.record(index)))
            except Exception:  # an unreadable record is skipped at training time; its length does not matter
                lengths.append(0)
        return lengths


class ListSource(ImageTextSource):
    """Upstream JSON lists: entries `{"image", "annotation" | caption_key | "conversations"}` (module docstring)."""

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        image_folder: str | os.PathLike,
        caption_folder: str | os.PathLike | None = None,
        caption_key: str = "caption",
        name: str = "list",
    ):
        self.entries = list(entries)
        self.image_folder = Path(image_folder)
        self.caption_folder = Path(caption_folder) if caption_folder is not None else self.image_folder
        self.caption_key = caption_key
        self.name = name

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, index: int) -> ImageTextRecord:
        entry = self.entries[index]
        if not isinstance(entry, dict) or "image" not in entry:
            raise BrokenExampleError(f"entry {index} of {self.name} has no 'image' field: {str(entry)[:120]}")
        annotation = entry.get("annotation")
        return ImageTextRecord(
            image=self.image_folder / str(entry["image"]),
            text=entry.get(self.caption_key),
            annotation=str(self.caption_folder / str(annotation)) if annotation is not None else None,
            caption_key=self.caption_key,
            conversation=entry.get("conversations"),
            name=f"{self.name}[{index}] ({entry['image']})",
        )


class ImageFolderSource(ImageTextSource):
    """A folder with `metadata.jsonl` / `metadata.csv`: a `file_name` column (image paths relative to the metadata
    file) and a text column."""

    def __init__(self, metadata_file: str | os.PathLike, text_column: str | None = None, name: str | None = None):
        metadata_file = Path(metadata_file)
        self.root = metadata_file.parent
        self.name = name or str(self.root)
        if metadata_file.suffix == ".csv":
            with open(metadata_file, newline="", encoding="utf-8") as f:
                self.rows = list(csv.DictReader(f))
        else:
            self.rows = []
            with open(metadata_file, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            self.rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{metadata_file}:{line_no} is not valid JSON: {err}") from None
        if not self.rows:
            raise ValueError(f"{metadata_file} lists no example.")
        columns = set(self.rows[0])
        if "file_name" not in columns:
            raise ValueError(f"{metadata_file} has no 'file_name' column (columns: {sorted(columns)}).")
        self.text_column = text_column or _pick_column(columns - {"file_name"}, _TEXT_COLUMNS, "text", metadata_file)

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, index: int) -> ImageTextRecord:
        row = self.rows[index]
        return ImageTextRecord(
            image=self.root / str(row["file_name"]),
            text=row.get(self.text_column),
            conversation=row.get("conversations"),
            name=f"{self.name}[{index}] ({row['file_name']})",
        )


class HFDatasetSource(ImageTextSource):
    """A 🤗 `datasets.Dataset` with an image column and a text column (rows are read on demand)."""

    def __init__(
        self,
        dataset: Any,
        image_column: str | None = None,
        text_column: str | None = None,
        root: str | os.PathLike | None = None,
        name: str = "dataset",
    ):
        self.dataset = dataset
        columns = set(dataset.column_names)
        self.image_column = image_column or _pick_column(columns, _IMAGE_COLUMNS, "image", name)
        self.text_column = text_column or _pick_column(columns - {self.image_column}, _TEXT_COLUMNS, "text", name)
        for column in (self.image_column, self.text_column):
            if column not in columns:
                raise ValueError(f"{name} has no column {column!r} (columns: {sorted(columns)}).")
        self.root = Path(root) if root is not None else None
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> ImageTextRecord:
        try:
            row = self.dataset[index]  # decoding the image column may fail here
        except Exception as err:  # any decoding error makes the row unusable
            raise BrokenExampleError(
                f"{self.name}[{index}]: cannot read the row ({type(err).__name__}: {err})"
            ) from err
        image = row[self.image_column]
        if isinstance(image, str) and self.root is not None and not os.path.isabs(image):
            image = self.root / image
        return ImageTextRecord(image=image, text=row[self.text_column], name=f"{self.name}[{index}]")

    def text_lengths(self) -> list[int]:
        # the text column alone: reading whole rows would decode every image
        return [_text_length(ImageTextRecord(image=None, text=text)) for text in self.dataset[self.text_column]]


def _text_length(record: ImageTextRecord) -> int:
    if record.conversation:
        return sum(len(turn.get("value", "")) for turn in record.conversation if isinstance(turn, dict))
    text = record.text
    if isinstance(text, str):
        return len(text)
    if isinstance(text, (list, tuple)):
        return max((len(t) for t in text if isinstance(t, str)), default=0)
    return 0  # in an annotation file: not read for this


def _pick_column(columns: set[str], candidates: Sequence[str], kind: str, where: Any) -> str:
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"Cannot tell which column of {where} holds the {kind} (columns: {sorted(columns)}); "
        f"pass {kind}_column explicitly."
    )


def _read_json_lists(path: Path) -> list[dict[str, Any]]:
    files = sorted(glob.glob(str(path / "*.json"))) if path.is_dir() else [str(path)]
    if not files:
        raise ValueError(f"{path} holds no *.json list file.")
    entries: list[dict[str, Any]] = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{file} must hold a JSON list of entries, got {type(data).__name__}.")
        entries += data
    return entries


def _sources_from_data_info(info_file: Path) -> list[ImageTextSource]:
    with open(info_file, encoding="utf-8") as f:
        info = json.load(f)
    specs = info.get("datasets", [info]) if isinstance(info, dict) else info
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{info_file} must hold an object or {{'datasets': [objects]}}.")
    base = info_file.parent
    sources: list[ImageTextSource] = []
    for i, spec in enumerate(specs):
        spec = {_UPSTREAM_ALIASES.get(k, k): v for k, v in spec.items()}
        if "annotations" not in spec:
            raise ValueError(f"{info_file}: dataset {i} needs 'annotations' (or upstream's 'data_path').")
        annotations = base / spec["annotations"]
        image_folder = base / spec.get("image_folder", ".")
        caption_folder = base / spec["caption_folder"] if spec.get("caption_folder") else None
        sources.append(
            ListSource(
                _read_json_lists(annotations),
                image_folder=image_folder,
                caption_folder=caption_folder,
                caption_key=spec.get("caption_key", "caption"),
                name=spec.get("name", f"{info_file.parent.name}/{Path(spec['annotations']).name}"),
            )
        )
    return sources


def load_source(
    spec: str | os.PathLike | Any,
    image_column: str | None = None,
    text_column: str | None = None,
    split: str = "train",
) -> list[ImageTextSource]:
    """Resolve one data source specification into sources (see the module docstring for the formats).

    Args:
        spec: a path (`data_info.json`, a JSON list file, a folder of them, an image folder with `metadata.jsonl`,
            a `datasets.save_to_disk` folder), a `datasets` name, a `datasets.Dataset` / `DatasetDict`, or an
            `ImageTextSource`.
        image_column / text_column: column names for image folders and `datasets` data (default: guessed).
        split: split of a `DatasetDict` / `load_dataset` call.
    """
    if isinstance(spec, ImageTextSource):
        return [spec]
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "column_names") and isinstance(spec.column_names, dict):  # DatasetDict
            spec = spec[split]
        if hasattr(spec, "column_names"):
            return [HFDatasetSource(spec, image_column, text_column, name="dataset")]
        raise TypeError(f"Unsupported data source {type(spec).__name__}.")
    path = Path(spec)
    if path.is_file():
        if path.name == "data_info.json":
            return _sources_from_data_info(path)
        if path.suffix == ".json":
            return [ListSource(_read_json_lists(path), path.parent, name=path.name)]
        if path.suffix in (".jsonl", ".csv"):
            return [ImageFolderSource(path, text_column)]
        raise ValueError(f"Unsupported data file {path} (expected data_info.json, *.json, metadata.jsonl/csv).")
    if path.is_dir():
        if (path / "data_info.json").is_file():
            return _sources_from_data_info(path / "data_info.json")
        for folder in (path, path / split):
            for name in ("metadata.jsonl", "metadata.csv"):
                if (folder / name).is_file():
                    return [ImageFolderSource(folder / name, text_column, name=str(path))]
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            datasets = _import_datasets()
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
            return [HFDatasetSource(loaded, image_column, text_column, root=path, name=str(path))]
        if glob.glob(str(path / "*.json")):
            return [ListSource(_read_json_lists(path), path, name=str(path))]
        raise ValueError(
            f"{path} is not a recognised data folder (no data_info.json, metadata.jsonl/csv, saved dataset or *.json)."
        )
    datasets = _import_datasets()
    loaded = datasets.load_dataset(str(spec), split=split)
    return [HFDatasetSource(loaded, image_column, text_column, name=str(spec))]


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "Reading 🤗 datasets data needs the `datasets` package: pip install 'harmon-hf[training]' (or datasets)."
        ) from err
    return datasets


# ------------------------------------------------------------------------------------------------------------------
# the per-task dataset
# ------------------------------------------------------------------------------------------------------------------
def as_generator(seed: int | None) -> torch.Generator | None:
    """A CPU `torch.Generator` seeded with `seed` (None: no generator, i.e. torch's global one)."""
    return None if seed is None else torch.Generator().manual_seed(int(seed) % (2**63))


@dataclass
class ImageTextDataset(Dataset):
    """Examples of one task from one or more sources, loaded, checked and preprocessed.

    Indexing accepts an int or a `(index, seed)` pair: the seed (from `MixedTaskBatchSampler`) drives every random
    choice of the example (crop offset, question, caption choice), which makes runs and resumed runs reproducible.

    Returned example (a dict):

    - `text2image`: `pixel_values` float32 `(3, S, S)` in [-1, 1] (or `image_tokens` `(S/16, S/16, C)` when a latent
      cache is attached), `caption` (str), `seed`, `num_skipped`, `task`.
    - `image2text`: `pixel_values` `(3, S, S)` (or `image_tokens` with a latent cache), `conversation` (chat
      messages with one `{"type": "image"}` item), `seed`, `num_skipped`, `task`.

    Args:
        sources: the data sources (`load_source`).
        task: `"text2image"` or `"image2text"`.
        image_processor: a `HarmonImageProcessor` (its understanding and `preprocess_t2i` preprocessing are used).
        resolution: output side S in pixels (256 for stages 1-2, 512 for stage 3).
        caption_prompts: `"dense"`, `"short"` or a list of questions (image2text captions).
        t2i_crop: `"random"` (upstream) or `"center"` (deterministic: allows latent caching).
        min_image_size: smallest accepted width/height; `max_aspect_ratio`: largest accepted elongation.
        max_retries: substitutes tried for a broken example before giving up.
    """

    sources: Sequence[ImageTextSource]
    task: str
    image_processor: HarmonImageProcessor
    resolution: int = 256
    caption_prompts: str | Sequence[str] = "dense"
    t2i_crop: str = "random"
    min_image_size: int = 16
    max_aspect_ratio: float = 10.0
    max_retries: int = 64
    latent_cache: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")
        if self.t2i_crop not in ("random", "center"):
            raise ValueError(f"t2i_crop must be 'random' or 'center', got {self.t2i_crop!r}.")
        if isinstance(self.caption_prompts, str):
            if self.caption_prompts not in CAPTION_PROMPTS:
                raise ValueError(f"caption_prompts must be one of {sorted(CAPTION_PROMPTS)} or a list of questions.")
            self.caption_prompts = CAPTION_PROMPTS[self.caption_prompts]
        self.caption_prompts = tuple(self.caption_prompts)
        if not self.caption_prompts:
            raise ValueError("caption_prompts is empty.")
        self.sources = list(self.sources)
        self._offsets = [0]
        for source in self.sources:
            self._offsets.append(self._offsets[-1] + len(source))
        if len(self) == 0:
            raise ValueError(f"The {self.task} data is empty.")
        self._num_warnings = 0
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return self._offsets[-1]

    def text_lengths(self) -> list[int]:
        """`ImageTextSource.text_lengths` of every example (the sources concatenated)."""
        return [length for source in self.sources for length in source.text_lengths()]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), None
        generator = as_generator(seed)
        n = len(self)
        # Substitutes are spread over the dataset deterministically (neighbours are often broken together).
        stride = 7919 if n % 7919 else 1
        for attempt in range(self.max_retries + 1):
            candidate = (index + attempt * stride) % n
            if candidate in self._broken:  # known broken: already reported once by this process
                continue
            try:
                example = self.load(candidate, generator)
            except Exception as err:  # a broken example must never stop training
                self._broken.add(candidate)
                self._warn(candidate, err)
                continue
            example.update(task=self.task, seed=seed, num_skipped=attempt, index=candidate)
            return example
        raise RuntimeError(
            f"{self.max_retries + 1} examples in a row around index {index} of the {self.task} data are broken; "
            "check the data (see the warnings above)."
        )

    def _warn(self, index: int, err: Exception) -> None:
        # Each broken example is reported once per process; past 100 reports only every 1000th (the trainer's
        # `skipped_images` log still counts every replacement).
        self._num_warnings += 1
        if self._num_warnings <= 100 or self._num_warnings % 1000 == 0:
            suffix = " (from now on only every 1000th broken example is reported)" if self._num_warnings == 100 else ""
            logger.warning(f"Skipping broken {self.task} example {index}: {err}{suffix}")

    def record(self, index: int) -> ImageTextRecord:
        """The raw record of example `index` (across the concatenated sources)."""
        source_id = bisect.bisect_right(self._offsets, index) - 1
        return self.sources[source_id].record(index - self._offsets[source_id])

    # ----- loading ---------------------------------------------------------------------------------------------
    def load(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Load and preprocess example `index`; raises `BrokenExampleError` (or an I/O error) for a broken one."""
        record = self.record(index)
        text = self._caption(record, generator)
        if self.latent_cache is not None:
            cached = self.latent_cache.get(index)
            if cached is None:
                raise BrokenExampleError(f"{record.name}: no latents in the cache (its image was broken)")
            if self.task == TEXT_TO_IMAGE:
                return {"image_tokens": cached, "caption": text}
            return {"image_tokens": cached, "conversation": self._conversation(record, text, generator)}
        image = self.load_image(record)
        if self.task == TEXT_TO_IMAGE:
            return {"pixel_values": self.preprocess_t2i(image, generator), "caption": text}
        return {"pixel_values": self.preprocess_i2t(image), "conversation": self._conversation(record, text, generator)}

    def preprocess_i2t(self, image: PIL.Image.Image) -> torch.Tensor:
        """Understanding preprocessing (pad to a square, resize, scale): `(3, S, S)` float32 in [-1, 1]."""
        return self.image_processor(
            images=[image], size={"height": self.resolution, "width": self.resolution}, return_tensors="pt"
        )["pixel_values"][0]

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """This task's deterministic preprocessing (`preprocess_i2t`, or `preprocess_t2i` with the centre crop)."""
        if self.task == IMAGE_TO_TEXT:
            return self.preprocess_i2t(image)
        if self.t2i_crop != "center":
            raise ValueError(f"t2i_crop={self.t2i_crop!r} is random: its preprocessing has no fixed result.")
        return self.preprocess_t2i(image)

    def image_key(self, index: int) -> str | None:
        """What identifies example `index`'s image across examples and datasets (its path; None for in-memory
        images), so that a latent cache encodes a picture shared by several examples once."""
        image = self.record(index).image
        if isinstance(image, dict):
            image = image.get("path") if image.get("bytes") is None else None
        return str(image) if isinstance(image, (str, os.PathLike)) else None

    def preprocess_t2i(self, image: PIL.Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Square crop (random or centred) + resize + scale: `(3, S, S)` float32 in [-1, 1]."""
        offset = None
        if self.t2i_crop == "center":
            offset = abs(image.width - image.height) // 2
        return self.image_processor.preprocess_t2i(
            image, crop_offsets=offset, generator=generator, size=self.resolution, return_tensors="pt"
        )["pixel_values"][0]

    def load_image(self, record: ImageTextRecord) -> PIL.Image.Image:
        """Decode the record's image and check its size and aspect ratio."""
        image = record.image
        if isinstance(image, dict):
            if image.get("bytes") is not None:
                image = image["bytes"]
            elif image.get("path"):
                image = image["path"]
            else:
                raise BrokenExampleError(f"{record.name}: empty image entry")
        if isinstance(image, (bytes, bytearray)):
            image = PIL.Image.open(io.BytesIO(image))
            image.load()
        elif isinstance(image, (str, os.PathLike)):
            image = load_image_file(image)
        elif not isinstance(image, PIL.Image.Image):
            raise BrokenExampleError(f"{record.name}: unsupported image value of type {type(image).__name__}")
        width, height = image.size
        if min(width, height) < self.min_image_size:
            raise BrokenExampleError(f"{record.name}: image of {width}x{height} is below {self.min_image_size} px")
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise BrokenExampleError(
                f"{record.name}: image of {width}x{height} is more elongated than {self.max_aspect_ratio}:1"
            )
        return image

    def _caption(self, record: ImageTextRecord, generator: torch.Generator | None) -> str | None:
        text = record.text
        if record.annotation is not None:
            try:
                with open(record.annotation, encoding="utf-8") as f:
                    text = json.load(f)[record.caption_key]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise BrokenExampleError(f"{record.name}: cannot read caption file {record.annotation}: {err}") from err
        if text is None and record.conversation is not None:
            if self.task == IMAGE_TO_TEXT:
                return None  # the conversation is used as is
            answers = [turn.get("value", "") for turn in record.conversation if turn.get("from") == "gpt"]
            text = answers[0] if answers else None
        if isinstance(text, (list, tuple)):
            text = [t for t in text if isinstance(t, str) and t.strip()]
            if not text:
                raise BrokenExampleError(f"{record.name}: no caption")
            text = text[_randint(len(text), generator)]
        if not isinstance(text, str) or not text.strip():
            raise BrokenExampleError(f"{record.name}: empty or missing caption")
        return text.strip()

    def _conversation(
        self, record: ImageTextRecord, caption: str | None, generator: torch.Generator | None
    ) -> list[dict[str, Any]]:
        if caption is None:
            return llava_to_messages(record.conversation, record.name)
        question = self.caption_prompts[_randint(len(self.caption_prompts), generator)]
        return [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": caption},
        ]


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high, (1,), generator=generator).item()) if high > 1 else 0


def llava_to_messages(turns: Sequence[dict[str, str]] | None, name: str = "") -> list[dict[str, Any]]:
    """LLaVA turns (`from` human/gpt, `value`) -> chat messages; the `<image>` marker of the first human turn becomes
    an image item placed before its text (as upstream: `<image>\\n{question}`)."""
    if not turns or len(turns) < 2:
        raise BrokenExampleError(f"{name}: a conversation needs a human and a gpt turn")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        role = {"human": "user", "gpt": "assistant"}.get(turn.get("from", ""))
        value = turn.get("value")
        if role is None or not isinstance(value, str):
            raise BrokenExampleError(f"{name}: turn {i} is not a human/gpt turn with a string value")
        if role == "user" and i == 0:
            content: Any = [{"type": "image"}, {"type": "text", "text": value.replace("<image>", "").strip()}]
        else:
            if "<image>" in value:
                raise BrokenExampleError(f"{name}: only the first human turn may hold <image>")
            content = value.strip()
        messages.append({"role": role, "content": content})
    if messages[0]["role"] != "user" or all(m["role"] != "assistant" for m in messages):
        raise BrokenExampleError(f"{name}: the conversation must start with a human turn and contain a gpt turn")
    return messages


# ------------------------------------------------------------------------------------------------------------------
# the mixed-task dataset
# ------------------------------------------------------------------------------------------------------------------
class MixedTaskDataset(Dataset):
    """The training dataset: one `ImageTextDataset` per task, indexed by `(task, index, seed)` keys.

    `MixedTaskBatchSampler` produces the keys (each batch holds one task). `set_epoch` is forwarded to the sampler
    registered with `register_sampler`: accelerate calls the dataset's `set_epoch` whatever wrappers it put around the
    sampler (in a multi-process run resumed mid-epoch the Trainer cannot reach the sampler itself).
    """

    def __init__(self, datasets: dict[str, ImageTextDataset]):
        datasets = {task: ds for task, ds in datasets.items() if ds is not None}
        if not datasets:
            raise ValueError("MixedTaskDataset needs at least one task dataset.")
        for task, ds in datasets.items():
            if task not in TASKS or ds.task != task:
                raise ValueError(f"dataset for {task!r} has task {getattr(ds, 'task', None)!r}")
        self.datasets = datasets
        self._epoch_listeners: list[Callable[[int], None]] = []

    @property
    def tasks(self) -> list[str]:
        return list(self.datasets)

    def task_sizes(self) -> dict[str, int]:
        return {task: len(ds) for task, ds in self.datasets.items()}

    def __len__(self) -> int:
        return sum(self.task_sizes().values())

    def __getitem__(self, key: tuple[str, int, int] | tuple[str, int]) -> dict[str, Any]:
        task, index = key[0], int(key[1])
        if task not in self.datasets:
            raise KeyError(f"no {task!r} data in this dataset (tasks: {self.tasks})")
        return self.datasets[task][(index, int(key[2])) if len(key) > 2 else index]

    def register_sampler(self, sampler: Any) -> None:
        """Forward `set_epoch` to `sampler` (replacing an earlier one: a dataset feeds one training loop)."""
        self._epoch_listeners = [sampler.set_epoch]

    def set_epoch(self, epoch: int) -> None:
        for listener in self._epoch_listeners:
            listener(epoch)


def build_task_dataset(
    specs: Sequence[str | Any] | None,
    task: str,
    image_processor: HarmonImageProcessor,
    image_column: str | None = None,
    text_column: str | None = None,
    split: str = "train",
    **kwargs: Any,
) -> ImageTextDataset | None:
    """`ImageTextDataset` of `task` over all `specs` (None when no spec is given); kwargs go to the dataset."""
    if not specs:
        return None
    sources: list[ImageTextSource] = []
    for spec in specs:
        sources += load_source(spec, image_column=image_column, text_column=text_column, split=split)
    return ImageTextDataset(sources, task, image_processor, **kwargs)


__all__ = [
    "BrokenExampleError",
    "CAPTION_PROMPTS",
    "DENSE_CAPTION_PROMPTS",
    "HFDatasetSource",
    "IMAGE_TO_TEXT",
    "ImageFolderSource",
    "ImageTextDataset",
    "ImageTextRecord",
    "ImageTextSource",
    "ListSource",
    "MixedTaskDataset",
    "SHORT_CAPTION_PROMPTS",
    "TASKS",
    "TEXT_TO_IMAGE",
    "build_task_dataset",
    "llava_to_messages",
    "load_source",
]
