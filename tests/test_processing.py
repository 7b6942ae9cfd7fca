"""HarmonImageProcessor / HarmonProcessor: upstream fixture parity, input types, save/load, error messages."""

from __future__ import annotations

import io
import random

import numpy as np
import PIL.Image
import pytest
import torch
from fixture_utils import FIXTURE_DIR, assert_fixture_close, fixture_json, load_tensors, requires_fixture
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from harmon_hf.configuration_harmon import HarmonConfig
from harmon_hf.image_processing_harmon import HarmonImageProcessor, to_rgb_levels
from harmon_hf.processing_harmon import HARMON_CHAT_TEMPLATE, HarmonProcessor, prepare_tokenizer

pytestmark = requires_fixture

LLM_DIR = FIXTURE_DIR / "llm"
IMAGE_A = FIXTURE_DIR / "images" / "input_a.png"
IMAGE_B = FIXTURE_DIR / "images" / "input_b.png"


@pytest.fixture(scope="module")
def processor() -> HarmonProcessor:
    """The tiny fixture setup: 64 px images (4x4 tokens) and 8 buffer slots -> 24 placeholders per image."""
    return HarmonProcessor.from_llm_dir(LLM_DIR, image_size=64, buffer_size=8)


@pytest.fixture(scope="module")
def image_processor() -> HarmonImageProcessor:
    return HarmonImageProcessor(size=64)


def _levels(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] CHW -> uint8 levels HWC (inverse of 2 * v / 255 - 1)."""
    return ((pixel_values + 1) * 127.5).round().to(torch.int64).permute(1, 2, 0)


def _user(question: str, n_images: int = 1) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}


# ------------------------------------------------------------------------------------------------------------------
# fixture parity
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, path", [("a", IMAGE_A), ("b", IMAGE_B)])
def test_understanding_preprocess_matches_fixture(image_processor, name, path):
    for source in (str(path), path, PIL.Image.open(path)):
        pixel_values = image_processor(source, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (1, 3, 64, 64) and pixel_values.dtype == torch.float32
        assert_fixture_close(pixel_values[0], "preprocess.safetensors", f"und_pixel_values_{name}")
        assert_fixture_close(_levels(pixel_values[0]), "preprocess.safetensors", f"und_uint8_{name}")
    # bitwise, not only within tolerance
    assert torch.equal(pixel_values[0], load_tensors("preprocess.safetensors")[f"und_pixel_values_{name}"])


@pytest.mark.parametrize("name, path", [("a", IMAGE_A), ("b", IMAGE_B)])
def test_t2i_preprocess_matches_fixture(image_processor, name, path):
    facts = fixture_json()["preprocess"][name]
    out = image_processor.preprocess_t2i(
        str(path), crop_offsets=facts["crop2square_randint"]["value"], return_crop_boxes=True
    )
    assert out["crop_boxes"].tolist() == [facts["crop_box_xyxy"]]
    assert_fixture_close(out["pixel_values"][0], "preprocess.safetensors", f"t2i_pixel_values_{name}")
    assert_fixture_close(_levels(out["pixel_values"][0]), "preprocess.safetensors", f"t2i_uint8_{name}")


def test_t2i_random_crop_generators(image_processor):
    images = [PIL.Image.open(IMAGE_A), PIL.Image.open(IMAGE_B)]  # 90x60 and 60x90: offsets in [0, 30]
    for make in (lambda: torch.Generator().manual_seed(3), lambda: np.random.default_rng(3), lambda: random.Random(3)):
        first = image_processor.preprocess_t2i(images, generator=make(), return_crop_boxes=True)
        second = image_processor.preprocess_t2i(images, generator=make(), return_crop_boxes=True)
        assert torch.equal(first["pixel_values"], second["pixel_values"])
        assert torch.equal(first["crop_boxes"], second["crop_boxes"])
        boxes = first["crop_boxes"].tolist()
        assert boxes[0][1] == 0 and boxes[0][2] - boxes[0][0] == 60 and 0 <= boxes[0][0] <= 30
        assert boxes[1][0] == 0 and boxes[1][3] - boxes[1][1] == 60 and 0 <= boxes[1][1] <= 30
    offsets = {
        image_processor.preprocess_t2i(IMAGE_A, return_crop_boxes=True)["crop_boxes"][0, 0].item() for _ in range(40)
    }
    assert len(offsets) > 1 and all(0 <= o <= 30 for o in offsets)
    with pytest.raises(ValueError, match="out of range"):
        image_processor.preprocess_t2i(IMAGE_A, crop_offsets=31)
    with pytest.raises(ValueError, match="2 images"):
        image_processor.preprocess_t2i(images, crop_offsets=[1, 2, 3])


def test_understanding_input_ids_match_fixture(processor):
    facts = fixture_json()["understanding"]
    messages = [_user(facts["question"])]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == facts["prompt_text_before_expansion"]
    inputs = processor(images=PIL.Image.open(IMAGE_A), text=prompt)
    assert (inputs["input_ids"] == processor.image_token_id).sum().item() == facts["image_length"] == 24
    assert_fixture_close(inputs["input_ids"], "understanding.safetensors", "input_ids")
    assert_fixture_close(inputs["pixel_values"], "understanding.safetensors", "pixel_values")
    assert inputs["attention_mask"].all()

    # the same through apply_chat_template(tokenize=True), the image given in the message
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(IMAGE_A)}, {"type": "text", "text": facts["question"]}],
        }
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert_fixture_close(inputs["input_ids"], "understanding.safetensors", "input_ids")
    assert_fixture_close(inputs["pixel_values"], "understanding.safetensors", "pixel_values")


def test_image_to_text_training_batch_matches_fixture(processor):
    facts = fixture_json()["loss_image2text"]
    conversations = [
        [_user(q), {"role": "assistant", "content": c}] for q, c in zip(facts["questions"], facts["captions"])
    ]
    images = [PIL.Image.open(IMAGE_A), PIL.Image.open(IMAGE_B)]
    batch = processor.build_i2t_training_batch(conversations, images=images)
    assert_fixture_close(batch["input_ids"], "loss_image2text.safetensors", "input_ids_image_token")
    assert_fixture_close(batch["labels"], "loss_image2text.safetensors", "labels")
    assert_fixture_close(batch["attention_mask"], "loss_image2text.safetensors", "attention_mask")
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    # the -200 variant of upstream's data pipeline is the same layout
    upstream = load_tensors("loss_image2text.safetensors")["input_ids"]
    assert torch.equal(torch.where(upstream == -200, processor.image_token_id, upstream), batch["input_ids"])
    # without images: same ids (sizes from the processor)
    no_images = processor.build_i2t_training_batch(conversations)
    assert torch.equal(no_images["input_ids"], batch["input_ids"]) and "pixel_values" not in no_images
    # labels are exactly the tokens transformers' assistant mask selects
    for conversation, labels in zip(conversations, batch["labels"]):
        out = processor.apply_chat_template(
            conversation,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            processor_kwargs={"images": [PIL.Image.open(IMAGE_A)]},
        )
        mask = torch.tensor(out["assistant_masks"][0], dtype=torch.bool)
        ids = out["input_ids"][0]
        assert torch.equal(ids[mask], labels[labels != -100])


def test_text_to_image_prompts_match_fixture(processor):
    facts = fixture_json()
    captions = facts["loss_text2image"]["captions"]  # [caption, None]: None = dropped caption
    batch = processor.build_t2i_prompts(captions, add_unconditional=False)
    assert_fixture_close(batch["input_ids"], "loss_text2image.safetensors", "input_ids")
    assert_fixture_close(batch["attention_mask"], "loss_text2image.safetensors", "attention_mask")
    texts = processor.batch_decode(batch["input_ids"] * batch["attention_mask"] + 0, skip_special_tokens=False)
    assert texts[0].startswith(facts["loss_text2image"]["prompts"][0])

    gen = facts["generation_step"]
    prompts = [gen["single_prompt"].removeprefix("Generate an image: "), "a small green cat in a field"]
    batch = processor.build_t2i_prompts(prompts)
    assert_fixture_close(batch["input_ids"], "generation_step.safetensors", "input_ids")
    assert_fixture_close(batch["attention_mask"], "generation_step.safetensors", "attention_mask")
    single = processor.build_t2i_prompts(prompts[0])
    assert_fixture_close(single["input_ids"], "generation_step.safetensors", "single_prompt_input_ids")
    assert_fixture_close(single["attention_mask"], "generation_step.safetensors", "single_prompt_attention_mask")


def test_t2i_prompt_options(processor):
    base = processor.build_t2i_prompts(["a", "b"], num_images_per_prompt=2, return_tensors=None)["input_ids"]
    assert len(base) == 8 and base[0] == base[1] != base[2] == base[3] and base[4] == base[7]
    negative = processor.build_t2i_prompts("a cat", negative_prompt="blurry")
    text = processor.decode(negative["input_ids"][1][negative["attention_mask"][1].bool()])
    assert text == "<|im_start|>user\nGenerate an image: blurry<|im_end|>\n<|im_start|>assistant\n"
    mixed = processor.build_t2i_prompts(["a", "b"], negative_prompt=[None, "dark"])
    uncond = processor.build_t2i_prompts("a")["input_ids"][1]
    assert torch.equal(mixed["input_ids"][2], uncond)
    with pytest.raises(ValueError, match="negative prompts"):
        processor.build_t2i_prompts(["a", "b"], negative_prompt=["x"])
    with pytest.raises(ValueError, match="<image>"):
        processor.build_t2i_prompts("a <image> cat")


# ------------------------------------------------------------------------------------------------------------------
# tokenizer, chat template, processor behaviour
# ------------------------------------------------------------------------------------------------------------------
def test_prepare_tokenizer(tmp_path):
    facts = fixture_json()["tokenizer"]
    tokenizer = prepare_tokenizer(LLM_DIR)
    assert len(tokenizer) == facts["len_with_image"]
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == facts["image_token_id"] == 500
    assert tokenizer("a<image>b")["input_ids"][1] == 500
    assert prepare_tokenizer(tokenizer) is tokenizer and len(tokenizer) == 501  # idempotent
    plain = AutoTokenizer.from_pretrained(LLM_DIR)
    prepared = prepare_tokenizer(plain)  # from a loaded object
    assert prepared.image_token_id == 500 and len(prepared) == 501
    prepared.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.image_token_id == 500 and len(reloaded) == 501
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        HarmonProcessor(HarmonImageProcessor(), AutoTokenizer.from_pretrained(LLM_DIR))


def test_chat_template_layouts(processor):
    one = processor.apply_chat_template([_user("Q?")], add_generation_prompt=True)
    assert one == "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert not one.startswith("<|im_start|>system")
    with_system = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    assert (
        with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    multi = processor.apply_chat_template(
        [
            _user("Q1", n_images=2),
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": [{"type": "text", "text": "Q2"}, {"type": "image"}]},
        ],
        add_generation_prompt=True,
    )
    assert multi == (
        "<|im_start|>user\n<image>\n<image>\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2\n<image><|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(images=[PIL.Image.open(IMAGE_A), PIL.Image.open(IMAGE_B), PIL.Image.open(IMAGE_A)], text=multi)
    assert (inputs["input_ids"] == processor.image_token_id).sum().item() == 3 * 24
    assert inputs["pixel_values"].shape == (3, 3, 64, 64)
    # tokenizer and processor share the template
    assert (
        processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.chat_template == HARMON_CHAT_TEMPLATE


def test_batch_is_left_padded_and_decodes(processor):
    prompts = [
        processor.apply_chat_template([_user("Describe the image.")], add_generation_prompt=True),
        processor.apply_chat_template(
            [_user("What is in this rather long picture, please?")], add_generation_prompt=True
        ),
    ]
    images = [[PIL.Image.open(IMAGE_A)], [PIL.Image.open(IMAGE_B)]]
    inputs = processor(images=images, text=prompts)
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert (inputs["input_ids"][0][mask[0] == 0] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(
        inputs["pixel_values"][1], processor.image_processor(IMAGE_B, return_tensors="pt")["pixel_values"][0]
    )
    right = processor(images=images, text=prompts, padding_side="right")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert processor.batch_decode(inputs["input_ids"][:, -3:]) == processor.tokenizer.batch_decode(
        inputs["input_ids"][:, -3:]
    )
    assert processor.decode(inputs["input_ids"][0, -6:]) == "<|im_start|>assistant\n"
    text_only = processor(text=["Hello there", "Hi"])
    assert text_only["attention_mask"][1, 0] == 0 and "pixel_values" not in text_only


def test_processor_input_errors(processor, tmp_path):
    image = PIL.Image.open(IMAGE_A)
    one_marker = processor.apply_chat_template([_user("Q")], add_generation_prompt=True)
    with pytest.raises(ValueError, match="1 <image> marker.*2 image"):
        processor(images=[image, image], text=one_marker)
    two_markers = processor.apply_chat_template([_user("Q", n_images=2)], add_generation_prompt=True)
    with pytest.raises(ValueError, match="2 <image> marker.*1 image"):
        processor(images=[image], text=two_markers)
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text=one_marker)
    with pytest.raises(ValueError, match="per sample"):
        processor(images=[[image, image], []], text=[one_marker, one_marker])
    with pytest.raises(ValueError, match="empty"):
        processor.apply_chat_template([], add_generation_prompt=True)
    with pytest.raises(ValueError, match="empty"):
        processor.apply_chat_template([[]], add_generation_prompt=True)
    with pytest.raises(ValueError, match="role"):
        processor.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="content items"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(TypeError, match="string"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="text.*images"):
        processor()
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(images=str(missing), text=one_marker)


def test_training_batch_errors_and_truncation(processor):
    conversation = [_user("Q"), {"role": "assistant", "content": "A long answer here."}]
    with pytest.raises(ValueError, match="assistant"):
        processor.build_i2t_training_batch([_user("Q")])
    with pytest.raises(ValueError, match="marker"):
        processor.build_i2t_training_batch(conversation, images=[PIL.Image.open(IMAGE_A)] * 2)
    with pytest.raises(ValueError, match="cut or drop the image tokens"):
        processor.build_i2t_training_batch(conversation, max_length=10)
    full = processor.build_i2t_training_batch(conversation)
    cut = processor.build_i2t_training_batch(conversation, max_length=full["input_ids"].shape[1] - 3)
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :-3])
    multi = processor.build_i2t_training_batch(
        [
            [
                _user("Q1"),
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ]
        ],
        return_tensors=None,
    )
    supervised = [t for t in multi["labels"][0] if t != -100]
    assert processor.decode(supervised) == "A1<|im_end|>A2<|im_end|>"


def test_num_image_tokens(processor):
    assert processor.num_image_tokens() == 24
    assert HarmonProcessor(HarmonImageProcessor(), processor.tokenizer).num_image_tokens() == 256 + 64
    assert HarmonProcessor(HarmonImageProcessor(size=512), processor.tokenizer).num_image_tokens() == 1024 + 64
    assert (
        HarmonConfig().num_image_tokens()
        == HarmonProcessor(HarmonImageProcessor(), processor.tokenizer, buffer_size=64).num_image_tokens()
    )


def test_save_and_load_round_trip(processor, tmp_path):
    AutoImageProcessor.register(HarmonConfig, image_processor_classes={"pil": HarmonImageProcessor}, exist_ok=True)
    AutoProcessor.register(HarmonConfig, HarmonProcessor, exist_ok=True)
    processor.save_pretrained(tmp_path)
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "chat_template.jinja").read_text() == HARMON_CHAT_TEMPLATE
    for loaded in (AutoProcessor.from_pretrained(tmp_path), HarmonProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, HarmonProcessor) and isinstance(loaded.image_processor, HarmonImageProcessor)
        assert loaded.buffer_size == 8 and loaded.image_size == 64 and loaded.image_token_id == 500
        assert loaded.padding_side == "left" and loaded.chat_template == processor.chat_template
        prompt = loaded.apply_chat_template([_user("Describe the image.")], add_generation_prompt=True)
        inputs = loaded(images=IMAGE_A, text=prompt)
        assert_fixture_close(inputs["input_ids"], "understanding.safetensors", "input_ids")
        assert_fixture_close(inputs["pixel_values"], "understanding.safetensors", "pixel_values")
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(image_processor, HarmonImageProcessor) and image_processor.background_color == (127, 127, 127)


# ------------------------------------------------------------------------------------------------------------------
# image processor: input types and modes
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgb_image() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))


def _pv(image_processor, image, **kwargs) -> torch.Tensor:
    return image_processor(image, return_tensors="pt", **kwargs)["pixel_values"]


def test_array_and_tensor_inputs_match_pil(image_processor, rgb_image):
    ref = _pv(image_processor, rgb_image)
    hwc = np.array(rgb_image)
    same = [
        hwc,
        np.ascontiguousarray(hwc.transpose(2, 0, 1)),
        hwc.astype(np.float32) / 255,
        hwc.astype(np.float64) / 255,
        torch.from_numpy(hwc).permute(2, 0, 1),
        torch.from_numpy(hwc).permute(2, 0, 1).float() / 255,
        torch.from_numpy(hwc).permute(2, 0, 1).to(torch.int64),
        hwc.astype(np.uint16) * 257,
    ]
    for image in same:
        assert torch.equal(_pv(image_processor, image), ref), (type(image), getattr(image, "dtype", None))
    assert torch.equal(_pv(image_processor, torch.from_numpy(hwc), input_data_format="channels_last"), ref)
    # batches: 4-D arrays, lists, nested lists
    batch = _pv(image_processor, np.stack([hwc, hwc]))
    assert batch.shape == (2, 3, 64, 64) and torch.equal(batch[1], ref[0])
    assert _pv(image_processor, [rgb_image, hwc, [torch.from_numpy(hwc).permute(2, 0, 1)]]).shape == (3, 3, 64, 64)
    listed = image_processor([rgb_image, rgb_image])["pixel_values"]
    assert isinstance(listed, list) and listed[0].shape == (3, 64, 64) and listed[0].dtype == np.float32
    # grey 2-D, bool
    grey = np.full((10, 12), 200, dtype=np.uint8)
    out = _pv(image_processor, grey)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert torch.equal(_pv(image_processor, grey > 100), _pv(image_processor, np.full((10, 12), 255, np.uint8)))


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "I", "F", "LA", "PA", "RGBa", "La", "RGBX", "I;16"]
)
def test_pil_modes(image_processor, rgb_image, mode):
    image = rgb_image.convert("P").convert("PA") if mode == "PA" else rgb_image.convert(mode)
    assert image.mode == mode
    out = _pv(image_processor, image)
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_pil_mode_semantics(image_processor, rgb_image):
    ref = _pv(image_processor, rgb_image)
    assert torch.equal(_pv(image_processor, rgb_image.convert("RGBA")), ref)  # opaque alpha = upstream
    assert torch.equal(_pv(image_processor, rgb_image.convert("RGBX")), ref)
    transparent = PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (to_rgb_levels(transparent) == 127).all()  # composited over the padding grey
    half = to_rgb_levels(PIL.Image.new("RGBA", (2, 2), (255, 0, 0, 128)))
    assert half[0, 0].tolist() == [191, 63, 63]
    assert (to_rgb_levels(transparent, background=(255, 255, 255)) == 255).all()
    assert (to_rgb_levels(PIL.Image.fromarray(np.full((4, 4), 65535, np.uint16))) == 255).all()  # 16-bit
    assert (to_rgb_levels(PIL.Image.fromarray(np.full((4, 4), 32896, np.uint16))) == 128).all()
    assert (to_rgb_levels(PIL.Image.new("I", (4, 4), 100)) == 100).all()
    assert (to_rgb_levels(PIL.Image.new("I", (4, 4), 65535)) == 255).all()
    palette = rgb_image.convert("P")
    palette.info["transparency"] = 0
    assert to_rgb_levels(palette).shape == (20, 30, 3)
    grey = to_rgb_levels(PIL.Image.new("L", (3, 3), 77))
    assert (grey == 77).all() and grey.shape == (3, 3, 3)


def test_degenerate_sizes(image_processor):
    tiny = _pv(image_processor, PIL.Image.new("RGB", (1, 1), (255, 0, 0)))
    assert tiny.shape == (1, 3, 64, 64) and torch.allclose(tiny[0, :, 32, 32], torch.tensor([1.0, -1.0, -1.0]))
    strip = _pv(image_processor, PIL.Image.new("RGB", (10000, 10), (255, 255, 255)))
    assert strip.shape == (1, 3, 64, 64)
    assert (_levels(strip[0])[0] == 127).all() and (_levels(strip[0])[32] > 127).all()
    with pytest.raises(ValueError, match="pixels"):
        image_processor(np.zeros((1, 20000, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty image"):
        image_processor(np.zeros((0, 10, 3), dtype=np.uint8))


def test_bad_inputs(image_processor, tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_processor(np.full((8, 8, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_processor(torch.full((3, 8, 8), -0.5))
    with pytest.raises(ValueError, match="NaN"):
        image_processor(np.full((8, 8, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        image_processor(np.full((8, 8, 3), 300, dtype=np.int64))
    with pytest.raises(TypeError, match="dtype"):
        image_processor(np.zeros((8, 8, 3), dtype=np.complex64))
    with pytest.raises(ValueError, match="channel axis"):
        image_processor(np.zeros((5, 6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="dimensions"):
        image_processor(np.zeros((1, 1, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="channels"):
        image_processor(np.zeros((8, 8, 2), dtype=np.uint8), input_data_format="channels_last")
    with pytest.raises(TypeError, match="Unsupported image type"):
        image_processor({"not": "an image"})
    with pytest.raises(ValueError, match="empty list"):
        image_processor([])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        image_processor(str(tmp_path / "nope.png"))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="garbage.png.*not a recognised image"):
        image_processor(str(garbage))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(IMAGE_A.read_bytes()[:900])
    with pytest.raises(ValueError, match="truncated.png.*truncated or corrupted"):
        image_processor(truncated)
    lazily_opened = PIL.Image.open(io.BytesIO(IMAGE_A.read_bytes()[:900]))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        image_processor(lazily_opened)
    with pytest.raises(ValueError, match="directory"):
        image_processor(str(tmp_path))


def test_size_validation(rgb_image):
    assert HarmonImageProcessor(size=512)(rgb_image, return_tensors="pt")["pixel_values"].shape == (1, 3, 512, 512)
    assert HarmonImageProcessor().size.height == 256
    with pytest.raises(ValueError, match="multiple of 16"):
        HarmonImageProcessor(size=100)
    with pytest.raises(ValueError, match="must equal width"):
        HarmonImageProcessor(size={"height": 64, "width": 128})
    with pytest.raises(ValueError, match="multiple of 16"):
        HarmonImageProcessor(size=64)(rgb_image, size=40)
    with pytest.raises(ValueError, match="background_color"):
        HarmonImageProcessor(background_color=(1, 2))
    out = HarmonImageProcessor(size=32)(rgb_image, size=48, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 48, 48)


def test_image_processor_save_load(tmp_path):
    processor = HarmonImageProcessor(size=128, background_color=(0, 0, 0))
    processor.save_pretrained(tmp_path)
    loaded = HarmonImageProcessor.from_pretrained(tmp_path)
    assert loaded.size.height == 128 and loaded.background_color == (0, 0, 0)
    image = PIL.Image.open(IMAGE_A)
    assert torch.equal(
        loaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )


# ------------------------------------------------------------------------------------------------------------------
# postprocess
# ------------------------------------------------------------------------------------------------------------------
def test_postprocess(image_processor, processor):
    x = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # upstream
    as_uint8 = image_processor.postprocess(x.numpy(), output_type="uint8")
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (2, 4, 5, 3)
    assert np.array_equal(as_uint8, expected.permute(0, 2, 3, 1).numpy())
    as_np = image_processor.postprocess(x, output_type="np")  # diffusers convention: float HWC in [0, 1]
    assert as_np.dtype == np.float32 and np.array_equal(as_np * 255, as_uint8.astype(np.float32))
    as_pt = image_processor.postprocess(x, output_type="pt")
    assert as_pt.dtype == torch.float32 and torch.equal((as_pt * 255).round().to(torch.uint8), expected)
    pils = processor.postprocess(x)
    assert len(pils) == 2 and pils[0].mode == "RGB" and pils[0].size == (5, 4)
    assert np.array_equal(np.asarray(pils[1]), as_uint8[1])
    assert np.array_equal(np.asarray(image_processor.postprocess(x[0])[0]), as_uint8[0])
    assert np.array_equal(image_processor.postprocess(list(x), output_type="uint8"), as_uint8)
    assert np.array_equal(
        image_processor.postprocess(x.to(torch.bfloat16), output_type="uint8"),
        torch.clamp(127.5 * x.to(torch.bfloat16).float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(),
    )
    levels = image_processor.postprocess(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1), output_type="uint8")
    assert levels.ravel().tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="NaN"):
        image_processor.postprocess(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        image_processor.postprocess(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="output_type"):
        image_processor.postprocess(x, output_type="latent")


def test_postprocess_matches_upstream_samples(image_processor):
    """The decoded sample images of the upstream sampling runs -> the upstream 8-bit levels and PNG."""
    sampling = load_tensors("sampling_cfg3_const_temp0_iter4.safetensors")
    levels = image_processor.postprocess(sampling["images"], output_type="uint8")
    assert_fixture_close(
        torch.from_numpy(levels).permute(0, 3, 1, 2), "sampling_cfg3_const_temp0_iter4.safetensors", "images_uint8"
    )
    assert np.array_equal(levels, sampling["images_uint8"].permute(0, 2, 3, 1).numpy().astype(np.uint8))
    png = np.asarray(PIL.Image.open(FIXTURE_DIR / "images" / "sample_cfg3_const_temp0_iter4.png").convert("RGB"))
    assert np.array_equal(png, np.concatenate(list(levels), axis=1))  # images side by side
