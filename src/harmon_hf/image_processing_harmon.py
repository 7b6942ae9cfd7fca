"""Image processor for Harmon (PIL backend, bit-exact with the upstream preprocessing).

Upstream Harmon feeds its VAE with images prepared by Pillow:

- understanding (image -> text): pad the image to a square with grey (127, 127, 127), the original pasted at
  offset ((side - w) // 2, (side - h) // 2); resize with Pillow's default filter for RGB (bicubic) to the model
  resolution; scale the 8-bit levels to [-1, 1] as `2 * (v / 255) - 1`; channels first.
- text-to-image training: a random square crop (side = shorter edge, offset drawn uniformly along the longer
  edge, both ends included), then the same resize and scaling (`HarmonImageProcessor.preprocess_t2i`).
- generated images (VAE output in [-1, 1]) become 8-bit levels as `uint8(clamp(127.5 * x + 128, 0, 255))`
  (truncation, as upstream), returned as PIL images or (diffusers convention) float levels / 255 in [0, 1]
  (`HarmonImageProcessor.postprocess`).

Every input is first turned into 8-bit RGB levels (what upstream's `Image.open(...).convert("RGB")` produces), so
that a single Pillow code path does the resampling whatever the input type. The rules:

- PIL images of any mode. Modes with transparency (RGBA, LA, PA, RGBa, La, or a palette / L / RGB image with a
  `transparency` entry) are alpha-composited over `background_color` (the padding grey by default), so transparent
  areas look like the padding the model already knows; a fully opaque image gives exactly the upstream result
  (upstream drops the alpha channel, which turns transparent areas into whatever colour they hide). 16-bit modes
  (`I;16*`) are scaled to 8 bits (`round(v / 257)`); mode `I` (32-bit integers) is read as 16-bit data when its
  maximum exceeds 255 and as 8-bit levels otherwise; `F` follows Pillow's own conversion to `L` (clip to
  [0, 255], truncate); CMYK, YCbCr, HSV, LAB, 1, P, ... use Pillow's `convert("RGB")`. EXIF orientation is NOT
  applied (as upstream).
- numpy arrays and torch tensors: `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in {1, 3, 4}, or a batch with one
  more leading dimension. The channel axis is taken from `input_data_format` when given, otherwise it is the axis
  of size 1/3/4; when both ends qualify, numpy arrays are read channels-last and torch tensors channels-first.
  dtypes: uint8 = levels; bool = {0, 255}; uint16 = 16-bit (`round(v / 257)`); other integers must already lie in
  [0, 255]; floats (incl. float16/bfloat16) must lie in [0, 1] and are quantised to `round(255 * v)`. 4 channels =
  RGBA (composited as above), 1 channel = grey.
- file paths (`str` / `os.PathLike`), URLs and data URIs: decoded eagerly; a missing, unreadable or truncated file
  raises a clear error naming the file.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, ImageInput, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

__all__ = ["HarmonImageProcessor", "HarmonImageProcessorKwargs"]

# The padded square of an extremely elongated image is materialised before resizing (as upstream does); refuse
# squares above this many pixels (16384^2, ~0.8 GB of RGB) instead of exhausting memory.
MAX_PADDED_PIXELS = 16384 * 16384

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class HarmonImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    background_color (`int` or `tuple[int, int, int]`, *optional*, defaults to `(127, 127, 127)`):
        RGB colour of the padding that makes an image square (and of the background transparent pixels are
        composited over).
    image_stride (`int`, *optional*, defaults to 16):
        Pixels per latent token side (VAE downsampling x MAR patch size). The output size must be a multiple of it.
    """

    background_color: int | list[int] | tuple[int, ...] | None
    image_stride: int | None


class HarmonImageProcessor(PilBackend):
    r"""
    Harmon image processor (PIL backend): pad to a grey square, bicubic resize, scale to [-1, 1].

    Outputs `pixel_values` of shape `(batch, 3, size, size)`, float32 in [-1, 1] (a list of `(3, size, size)` arrays
    when `return_tensors` is None). `size` must be a square whose side is a multiple of `image_stride` (16); 256 is
    the MAR training resolution, upstream runs understanding and generation at 512 as well.

    `do_pad` here means "pad to a square with `background_color`" (the upstream layout; `do_pad=False` stretches
    the image instead). See the module docstring for the accepted input types and how each one is turned into 8-bit
    RGB levels.

    Example:

    ```python
    >>> from PIL import Image
    >>> from harmon_hf import HarmonImageProcessor
    >>> processor = HarmonImageProcessor(size=512)
    >>> processor(Image.new("RGB", (640, 480)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 512, 512])
    ```
    """

    valid_kwargs = HarmonImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    size = {"height": 256, "width": 256}
    default_to_square = True
    do_resize = True
    do_pad = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    do_convert_rgb = True
    background_color = (127, 127, 127)
    image_stride = 16

    def __init__(self, **kwargs: Unpack[HarmonImageProcessorKwargs]):
        super().__init__(**kwargs)
        self.background_color = _as_rgb_tuple(self.background_color)
        _check_size(self.size, self.image_stride)

    # ------------------------------------------------------------------------------------------------------------
    # input handling
    # ------------------------------------------------------------------------------------------------------------
    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Load file paths, URLs and data URIs (recursively inside lists); other objects are returned unchanged.

        Unlike the base implementation this decodes the pixels at once, so that a truncated or corrupted file fails
        here with an error naming the file.
        """
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(x) for x in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_image_file(image_url_or_urls)
        return image_url_or_urls

    def flatten_images(self, images: ImageInput) -> list[Any]:
        """Flatten any supported (possibly nested or batched) image input into a list of single images.

        Single images are PIL images, 2-D/3-D numpy arrays or torch tensors; 4-D arrays/tensors are batches.
        Raises `TypeError`/`ValueError` naming the offending input.
        """
        flat: list[Any] = []
        _flatten_into(self.fetch_images(images), flat, depth=0)
        if not flat:
            raise ValueError("No image was given (empty list).")
        return flat

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list[Any]:
        return self.flatten_images(images)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        background_color: int | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Turn one image into 8-bit RGB levels, channels first: uint8 array `(3, H, W)`."""
        background = _as_rgb_tuple(self.background_color if background_color is None else background_color)
        return np.ascontiguousarray(to_rgb_levels(image, input_data_format, background).transpose(2, 0, 1))

    def _validate_preprocess_kwargs(self, size: SizeDict | None = None, image_stride: int | None = None, **kwargs):
        super()._validate_preprocess_kwargs(size=size, **kwargs)
        _check_size(size, self.image_stride if image_stride is None else image_stride)

    # ------------------------------------------------------------------------------------------------------------
    # geometric steps (all on uint8 levels, CHW)
    # ------------------------------------------------------------------------------------------------------------
    def pad_to_square(self, image: np.ndarray, background_color: Sequence[int] | int | None = None) -> np.ndarray:
        """Pad a `(3, H, W)` uint8 image to `(3, S, S)`, S = max(H, W), centred as upstream: the original is placed
        at x = (S - W) // 2, y = (S - H) // 2 on a `background_color` canvas."""
        background = _as_rgb_tuple(self.background_color if background_color is None else background_color)
        _, height, width = image.shape
        side = max(height, width)
        if side == height == width:
            return image
        if side * side > MAX_PADDED_PIXELS:
            raise ValueError(
                f"Image of size {width}x{height} (w x h) would be padded to a {side}x{side} square, more than "
                f"{MAX_PADDED_PIXELS} pixels. Crop or downscale such an extreme aspect ratio first."
            )
        canvas = np.empty((image.shape[0], side, side), dtype=image.dtype)
        canvas[...] = np.asarray(background, dtype=image.dtype)[:, None, None]
        top, left = (side - height) // 2, (side - width) // 2
        canvas[:, top : top + height, left : left + width] = image
        return canvas

    def resize_levels(
        self, image: np.ndarray, size: SizeDict, resample: PILImageResampling | int | None = None
    ) -> np.ndarray:
        """Resize a `(3, H, W)` uint8 image with Pillow (`Image.resize`, default bicubic) to `(3, size.height,
        size.width)`, exactly as upstream's `PIL.Image.resize` on an RGB image."""
        resample = self.resample if resample is None else resample
        pil = PIL.Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")
        if pil.size != (size.width, size.height):
            pil = pil.resize((size.width, size.height), resample=PILImageResampling(resample))
        return np.asarray(pil).transpose(2, 0, 1)

    def levels_to_pixel_values(
        self,
        levels: np.ndarray,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
    ) -> np.ndarray:
        """uint8 levels `(3, H, W)` -> float32 `(3, H, W)`. With the defaults this is `2 * (v / 255) - 1` (bitwise:
        dividing by 255 in float32, then `(x - 0.5) / 0.5`, which equals `2x - 1` exactly in floating point)."""
        pixels = levels.astype(np.float32)
        if do_rescale:
            inverse = 1.0 / rescale_factor
            if abs(inverse - round(inverse)) < 1e-6:
                pixels = pixels / np.float32(round(inverse))
            else:
                pixels = pixels * np.float32(rescale_factor)
        if do_normalize:
            mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.astype(np.float32, copy=False)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: str | TensorType | None,
        do_pad: bool | None = True,
        background_color: Sequence[int] | int | None = None,
        image_stride: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        stride = self.image_stride if image_stride is None else image_stride
        processed = []
        for image in images:
            if do_pad:
                image = self.pad_to_square(image, background_color)
            if do_resize:
                image = self.resize_levels(image, size, resample)
            _check_output_shape(image.shape, stride)
            processed.append(
                self.levels_to_pixel_values(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            )
        if return_tensors is not None and len({p.shape for p in processed}) > 1:
            raise ValueError(
                f"Cannot stack images of different sizes {sorted({p.shape for p in processed})}; "
                "keep do_resize=True or pass images of one size."
            )
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------------------------
    # text-to-image training preprocessing
    # ------------------------------------------------------------------------------------------------------------
    def preprocess_t2i(
        self,
        images: ImageInput,
        crop_offsets: int | Sequence[int | None] | None = None,
        generator: torch.Generator | np.random.Generator | random.Random | None = None,
        size: int | dict[str, int] | None = None,
        input_data_format: str | ChannelDimension | None = None,
        return_tensors: str | TensorType | None = "pt",
        return_crop_boxes: bool = False,
    ) -> BatchFeature:
        """Text-to-image training preprocessing (upstream `crop2square` + resize + scale).

        Each image is cropped to a square whose side is its shorter edge, at an offset along the longer edge drawn
        uniformly from `[0, longer - shorter]` (both ends included), then resized (bicubic) to `size` and scaled to
        [-1, 1].

        Args:
            images: one image or a batch (any input type of `preprocess`).
            crop_offsets: the offsets to use instead of random ones: one int for every image or one per image
                (`None` entries are drawn). For a square image the only valid offset is 0.
            generator: source of the random offsets: a `torch.Generator` (`torch.randint`), a numpy `Generator`
                (`integers`) or a `random.Random` (`randint`); `None` uses torch's global generator.
            size: output side (default: `self.size`); a multiple of `image_stride`.
            return_tensors: "pt" (default), "np" or None (list of arrays).
            return_crop_boxes: also return `crop_boxes`, int64 `(batch, 4)` as (x0, y0, x1, y1).

        Returns:
            `BatchFeature` with `pixel_values` `(batch, 3, size, size)` float32 in [-1, 1] (and `crop_boxes`).
        """
        target = self.size if size is None else SizeDict(**_size_dict(size))
        _check_size(target, self.image_stride)
        flat = self.flatten_images(images)
        if crop_offsets is None or isinstance(crop_offsets, (int, np.integer)):
            offsets: list[int | None] = [crop_offsets] * len(flat)
        else:
            offsets = list(crop_offsets)
            if len(offsets) != len(flat):
                raise ValueError(f"Got {len(offsets)} crop offsets for {len(flat)} images.")
        pixel_values, boxes = [], []
        for image, offset in zip(flat, offsets):
            levels = self.process_image(image, input_data_format=input_data_format)
            _, height, width = levels.shape
            side = min(height, width)
            span = max(height, width) - side
            if offset is None:
                offset = _draw_offset(span, generator)
            elif not 0 <= int(offset) <= span:
                raise ValueError(
                    f"Crop offset {offset} is out of range for a {width}x{height} (w x h) image: "
                    f"must lie in [0, {span}]."
                )
            offset = int(offset)
            if width >= height:
                box = (offset, 0, offset + side, side)
            else:
                box = (0, offset, side, offset + side)
            cropped = levels[:, box[1] : box[3], box[0] : box[2]]
            resized = self.resize_levels(cropped, target)
            pixel_values.append(
                self.levels_to_pixel_values(
                    resized, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
                )
            )
            boxes.append(box)
        data: dict[str, Any] = {"pixel_values": pixel_values}
        if return_crop_boxes:
            data["crop_boxes"] = np.asarray(boxes, dtype=np.int64)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------------------------
    # generated images
    # ------------------------------------------------------------------------------------------------------------
    def postprocess(
        self, images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray], output_type: str = "pil"
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Turn model images in [-1, 1] into 8-bit images exactly as upstream:
        `levels = uint8(clamp(127.5 * x + 128, 0, 255))` (computed in float32; the cast truncates).

        Args:
            images: `(batch, 3, H, W)` or `(3, H, W)` tensor/array (any float dtype), or a list of `(3, H, W)`.
            output_type: as in diffusers, all from the same upstream levels:
                "pil": list of RGB `PIL.Image`;
                "np": float32 array `(batch, H, W, 3)` = levels / 255 in [0, 1];
                "pt": float32 tensor `(batch, 3, H, W)` = levels / 255 in [0, 1];
                "uint8": uint8 array `(batch, H, W, 3)` of the levels themselves.
        """
        if output_type not in ("pil", "np", "pt", "uint8"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'uint8', got {output_type!r}.")
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("postprocess got an empty list of images.")
            images = torch.stack([torch.as_tensor(np.asarray(i) if isinstance(i, np.ndarray) else i) for i in images])
        tensor = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"postprocess expects a torch.Tensor or numpy array, got {type(images).__name__}.")
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(
                f"postprocess expects images of shape (batch, 3, H, W) in [-1, 1], got {tuple(tensor.shape)}."
            )
        if not tensor.is_floating_point():
            raise TypeError(f"postprocess expects floating point images in [-1, 1], got dtype {tensor.dtype}.")
        tensor = tensor.detach().to("cpu", torch.float32)
        if torch.isnan(tensor).any():
            raise ValueError("postprocess got NaN values: the generated images are invalid.")
        levels = torch.clamp(127.5 * tensor + 128.0, 0, 255).to(torch.uint8)
        if output_type == "pt":
            return levels.to(torch.float32) / 255.0
        hwc = levels.permute(0, 2, 3, 1).numpy()
        if output_type == "uint8":
            return hwc
        if output_type == "np":
            return hwc.astype(np.float32) / np.float32(255.0)
        return [PIL.Image.fromarray(image, mode="RGB") for image in hwc]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def load_image_file(source: str | os.PathLike) -> PIL.Image.Image:
    """Open and fully decode an image from a path (or an http(s) URL / data URI via transformers' `load_image`).

    Raises `FileNotFoundError` for a missing file and `ValueError` for a file that is not a readable image or is
    truncated/corrupted, naming the file.
    """
    text = os.fspath(source)
    if text.startswith(("http://", "https://", "data:")):
        from transformers.image_utils import load_image

        image = load_image(text)
        name = text[:80]
    else:
        if not os.path.exists(text):
            raise FileNotFoundError(f"Image file not found: {text!r}")
        if os.path.isdir(text):
            raise ValueError(f"Expected an image file but {text!r} is a directory.")
        name = text
        try:
            image = PIL.Image.open(text)
        except PIL.UnidentifiedImageError as err:
            raise ValueError(f"Cannot read image file {name!r}: not a recognised image format.") from err
        except OSError as err:
            raise ValueError(f"Cannot read image file {name!r}: {err}") from err
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot decode image file {name!r} (truncated or corrupted?): {err}") from err
    return image


def _flatten_into(obj: Any, out: list[Any], depth: int) -> None:
    if isinstance(obj, (list, tuple)):
        if depth > 3:
            raise ValueError("Images are nested too deeply (expected an image, a list, or a list of lists).")
        for item in obj:
            _flatten_into(item, out, depth + 1)
    elif isinstance(obj, PIL.Image.Image):
        out.append(obj)
    elif isinstance(obj, (np.ndarray, torch.Tensor)):
        if obj.ndim in (2, 3):
            out.append(obj)
        elif obj.ndim == 4:
            out.extend(obj[i] for i in range(obj.shape[0]))
        else:
            raise ValueError(
                f"An image array must have 2 (H, W), 3 (H, W, C) / (C, H, W) or 4 (batch) dimensions; got shape "
                f"{tuple(obj.shape)}."
            )
    elif obj is None:
        raise ValueError("Got None where an image was expected.")
    else:
        raise TypeError(
            f"Unsupported image type {type(obj).__name__}: pass PIL images, numpy arrays, torch tensors or file paths."
        )


def to_rgb_levels(
    image: Any, input_data_format: str | ChannelDimension | None = None, background: Sequence[int] = (127, 127, 127)
) -> np.ndarray:
    """Convert one image (PIL / numpy / torch) into 8-bit RGB levels: uint8 array `(H, W, 3)`.

    See the module docstring for the rules per mode / dtype. Transparent pixels are composited over `background`.
    """
    if isinstance(image, PIL.Image.Image):
        array = _pil_to_array(image)
    elif isinstance(image, torch.Tensor):
        array = _channels_last(image.detach().cpu(), input_data_format, prefer_first=True)
        if array.dtype == torch.bfloat16:
            array = array.to(torch.float32)
        array = _levels_from_array(array.numpy())
    elif isinstance(image, np.ndarray):
        array = _levels_from_array(_channels_last(image, input_data_format, prefer_first=False))
    else:
        raise TypeError(f"Unsupported image type {type(image).__name__}.")
    if array.ndim == 2:
        array = array[:, :, None]
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise ValueError(f"Got an empty image of size {width}x{height} (w x h).")
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 3:
        return np.ascontiguousarray(array)
    if channels == 4:
        return _composite(array, background)
    raise ValueError(f"Expected 1, 3 or 4 channels, got {channels}.")


def _pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot decode the PIL image (truncated or corrupted file?): {err}") from err
    mode = image.mode
    try:
        if mode in _SIXTEEN_BIT_MODES:
            return _scale_16bit(np.asarray(image))
        if mode == "I":
            values = np.asarray(image)
            return (
                _scale_16bit(values) if values.size and values.max() > 255 else np.clip(values, 0, 255).astype(np.uint8)
            )
        if mode == "F":
            return np.asarray(image.convert("L"))
        if mode == "La":  # premultiplied LA: Pillow only converts it to LA
            image = image.convert("LA")
        if mode in _TRANSPARENT_MODES or "transparency" in image.info:
            return np.asarray(image.convert("RGBA"))
        if mode == "RGB":
            return np.asarray(image)
        if mode == "L":
            return np.asarray(image)
        return np.asarray(image.convert("RGB"))
    except ValueError as err:
        raise ValueError(f"Cannot convert a PIL image of mode {mode!r} to RGB: {err}") from err


def _channels_last(array: Any, input_data_format: str | ChannelDimension | None, prefer_first: bool) -> Any:
    """Move the channel axis of a 2-D/3-D array or tensor last (2-D stays 2-D)."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(f"A single image must have 2 or 3 dimensions, got shape {tuple(array.shape)}.")
    if input_data_format is not None:
        try:
            fmt = ChannelDimension(input_data_format)
        except ValueError as err:
            raise ValueError(
                f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}."
            ) from err
        channels_first = fmt == ChannelDimension.FIRST
    else:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if not first and not last:
            raise ValueError(
                f"Cannot find the channel axis of an image of shape {tuple(array.shape)}: expected 1, 3 or 4 "
                "channels first (C, H, W) or last (H, W, C); pass input_data_format to disambiguate."
            )
        channels_first = first if first != last else prefer_first
    if channels_first:
        return array.permute(1, 2, 0) if isinstance(array, torch.Tensor) else np.moveaxis(array, 0, -1)
    return array


def _levels_from_array(array: np.ndarray) -> np.ndarray:
    """numpy image of any supported dtype -> uint8 levels (same shape)."""
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if dtype == np.uint16:
        return _scale_16bit(array)
    if np.issubdtype(dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"Integer images must hold 8-bit levels in [0, 255] (uint16 is read as 16-bit); got dtype {dtype} "
                f"with values in [{array.min()}, {array.max()}]."
            )
        return array.astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("Float image contains NaN or infinite values.")
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if low < -1e-6 or high > 1 + 1e-6:
            raise ValueError(
                f"Float images must hold values in [0, 1]; got values in [{low:.4g}, {high:.4g}]. Pass uint8 levels "
                "(0..255) or divide by 255 (images in [-1, 1] need (x + 1) / 2)."
            )
        return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(
        f"Unsupported image dtype {dtype}: use uint8, uint16, bool, integers in [0, 255] or floats in [0, 1]."
    )


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)


def _composite(rgba: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """Alpha-composite a uint8 `(H, W, 4)` image over a solid RGB background -> uint8 `(H, W, 3)`."""
    alpha = rgba[:, :, 3:4].astype(np.float64) / 255.0
    back = np.asarray(background, dtype=np.float64)[None, None, :]
    out = rgba[:, :, :3].astype(np.float64) * alpha + back * (1.0 - alpha)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _as_rgb_tuple(color: int | Sequence[int]) -> tuple[int, int, int]:
    values = [color] * 3 if isinstance(color, (int, np.integer)) else list(color)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise ValueError(f"background_color must be an int or 3 ints in [0, 255], got {color!r}.")
    return tuple(int(v) for v in values)


def _size_dict(size: int | dict[str, int]) -> dict[str, int]:
    if isinstance(size, (int, np.integer)):
        return {"height": int(size), "width": int(size)}
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return dict(size)
    raise ValueError(f"size must be an int or a dict with 'height' and 'width', got {size!r}.")


def _check_size(size: SizeDict | dict | None, stride: int) -> None:
    if size is None:
        return
    height, width = (size.height, size.width) if isinstance(size, SizeDict) else (size.get("height"), size.get("width"))
    if height is None or width is None:
        raise ValueError(f"Harmon needs a square output size given as an int or {{'height', 'width'}}; got {size}.")
    if height != width:
        raise ValueError(f"Harmon images are square: size height ({height}) must equal width ({width}).")
    if height <= 0 or height % stride != 0:
        raise ValueError(
            f"Image size must be a positive multiple of {stride} (one latent token per {stride} pixels); got {height}."
        )


def _check_output_shape(shape: tuple[int, ...], stride: int) -> None:
    _, height, width = shape
    if height % stride or width % stride:
        raise ValueError(
            f"Processed image of size {width}x{height} is not a multiple of {stride}; keep do_resize=True or pass "
            f"images whose (padded) size is a multiple of {stride}."
        )


def _draw_offset(span: int, generator: torch.Generator | np.random.Generator | random.Random | None) -> int:
    if span == 0:
        return 0
    if generator is None or isinstance(generator, torch.Generator):
        return int(torch.randint(0, span + 1, (1,), generator=generator).item())
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(0, span + 1))
    if isinstance(generator, random.Random):
        return generator.randint(0, span)
    raise TypeError(
        f"generator must be a torch.Generator, numpy Generator or random.Random, got {type(generator).__name__}."
    )
