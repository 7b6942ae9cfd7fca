"""Training: loss parity with the upstream fixture through `forward`, data sources, sampler, collator, stages, and
tiny end-to-end Trainer runs (loss drop, resume equality, 2-process CPU run)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from fixture_utils import FIXTURE_DIR, assert_fixture_close, fixture_json, load_tensors, requires_fixture
from safetensors import safe_open
from safetensors.torch import save_file

from harmon_hf.configuration_harmon import HarmonConfig
from harmon_hf.modeling_harmon import HarmonForConditionalGeneration
from harmon_hf.pipeline_harmon import HarmonPipeline
from harmon_hf.processing_harmon import HarmonProcessor
from harmon_hf.training import (
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    HarmonDataCollator,
    HarmonTrainer,
    HarmonTrainingArguments,
    ImageTextDataset,
    MixedTaskBatchSampler,
    MixedTaskDataset,
    attach_latent_cache,
    build_task_dataset,
    count_parameters,
    load_source,
    parse_task_ratio,
    set_trainable_modules,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIGS = EXAMPLES / "configs"
LLM_DIR = FIXTURE_DIR / "llm"
sys.path.insert(0, str(EXAMPLES))

requires_scheduler = pytest.mark.skipif(
    importlib.util.find_spec("harmon_hf.scheduling_harmon") is None, reason="harmon_hf.scheduling_harmon not available"
)
pytestmark = requires_fixture

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 210, 30),
    "purple": (150, 40, 170),
    "cyan": (30, 200, 210),
}


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor() -> HarmonProcessor:
    return HarmonProcessor.from_llm_dir(LLM_DIR, image_size=64, buffer_size=8)


def _shape_image(color: tuple[int, int, int], size: tuple[int, int] = (80, 64), index: int = 0) -> PIL.Image.Image:
    """A coloured rectangle on white, `size` = (w, h)."""
    w, h = size
    array = np.full((h, w, 3), 245, np.uint8)
    array[h // 4 : 3 * h // 4, w // 5 + index % 3 : 4 * w // 5] = color
    return PIL.Image.fromarray(array)


def make_shapes_folder(root: Path, broken: bool = True) -> Path:
    """An image folder with metadata.jsonl: one coloured shape per colour, plus a corrupt and a tiny image."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        _shape_image(rgb, (80 + 8 * (i % 2), 64), i).save(root / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": f"a {name} box on a white background"})
    if broken:
        (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        _shape_image((0, 0, 0), (8, 8)).save(root / "tiny.png")
        rows += [{"file_name": "corrupt.png", "text": "corrupt"}, {"file_name": "tiny.png", "text": "tiny"}]
    with open(root / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return root


def tiny_model(seed: int = 0) -> HarmonForConditionalGeneration:
    torch.manual_seed(seed)
    return HarmonForConditionalGeneration(HarmonConfig.tiny())


@pytest.fixture(scope="module")
def fixture_model() -> HarmonForConditionalGeneration:
    """The upstream-tiny weights in a harmon-hf model (converter key mapping + VAE conversion), eval mode."""
    from transformers import AutoConfig

    from harmon_hf.convert import convert_state_dict, infer_harmon_config, load_upstream_checkpoint
    from harmon_hf.convert_vae import convert_vae_state_dict, infer_vae_config, load_upstream_vae

    upstream = load_upstream_checkpoint(FIXTURE_DIR / "harmon.pth")
    vae = load_upstream_vae(FIXTURE_DIR / "kl16.ckpt")
    config = infer_harmon_config(
        upstream, AutoConfig.from_pretrained(LLM_DIR), infer_vae_config(vae), image_token_id=500
    )
    model = HarmonForConditionalGeneration(config)
    state = convert_state_dict(upstream)
    state.update({f"model.vae.{k}": v for k, v in convert_vae_state_dict(vae).items()})
    state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


def run_trainer(tmp: Path, data: Path, processor, steps: int, **overrides) -> HarmonTrainer:
    """Tiny model + mixed data through HarmonTrainer on CPU."""
    image_processor = processor.image_processor
    datasets = {
        IMAGE_TO_TEXT: build_task_dataset([data], IMAGE_TO_TEXT, image_processor, resolution=64),
        TEXT_TO_IMAGE: build_task_dataset([data], TEXT_TO_IMAGE, image_processor, resolution=64),
    }
    kwargs = dict(
        output_dir=str(tmp),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        task_ratio="image2text:1,text2image:1",
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    trainer = HarmonTrainer(
        model=tiny_model(),
        args=HarmonTrainingArguments(**kwargs),
        train_dataset=MixedTaskDataset(datasets),
        data_collator=HarmonDataCollator(processor),
        processing_class=processor,
    )
    return trainer


def load_saved(path: Path) -> HarmonForConditionalGeneration:
    return HarmonForConditionalGeneration.from_pretrained(path)


def task_losses(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if key in h]


# ------------------------------------------------------------------------------------------------------------------
# (1) loss parity with the upstream fixture, through forward
# ------------------------------------------------------------------------------------------------------------------
def test_image_to_text_loss_matches_fixture(fixture_model, processor):
    facts = fixture_json()["loss_image2text"]
    given = load_tensors("loss_image2text.safetensors")
    examples = [
        {
            "task": IMAGE_TO_TEXT,
            "pixel_values": pixels,
            "conversation": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": caption},
            ],
        }
        for pixels, question, caption in zip(given["pixel_values"], facts["questions"], facts["captions"])
    ]
    batch = HarmonDataCollator(processor)(examples)
    assert batch.pop("num_skipped_images") == 0
    assert torch.equal(batch["input_ids"], given["input_ids_image_token"])
    assert torch.equal(batch["labels"], given["labels"])
    assert torch.equal(batch["attention_mask"], given["attention_mask"])
    with torch.no_grad():
        out = fixture_model(**batch)
    assert out.loss_t2i is None
    assert_fixture_close(out.loss_i2t.reshape(1), "loss_image2text.safetensors", "loss")
    assert_fixture_close(out.loss.reshape(1), "loss_image2text.safetensors", "loss")
    supervised = batch["labels"][:, 1:] != -100
    assert_fixture_close(out.logits[:, :-1][supervised], "loss_image2text.safetensors", "supervised_logits")
    assert_fixture_close(batch["labels"][:, 1:][supervised], "loss_image2text.safetensors", "supervised_targets")
    assert abs(out.loss_i2t.item() - facts["loss"]) < 8e-5


@requires_scheduler
def test_text_to_image_loss_matches_fixture(fixture_model, processor):
    facts = fixture_json()["loss_text2image"]
    given = load_tensors("loss_text2image.safetensors")
    examples = [
        {"task": TEXT_TO_IMAGE, "pixel_values": pixels, "caption": caption}
        for pixels, caption in zip(given["pixel_values"], facts["captions"])
    ]
    batch = HarmonDataCollator(processor, unconditional_prob=0.0)(examples)
    batch.pop("num_skipped_images")
    assert torch.equal(batch["generation_input_ids"], given["input_ids"])
    assert torch.equal(batch["generation_attention_mask"], given["attention_mask"])
    injected = dict(
        generation_orders=given["orders"],
        generation_mask=given["mask"],
        diffusion_timesteps=given["t"],
        diffusion_noise=given["noise"],
    )
    with torch.no_grad():
        out = fixture_model(**batch, **injected)
        parts = fixture_model.text_to_image_loss(
            input_ids=batch["generation_input_ids"],
            attention_mask=batch["generation_attention_mask"],
            pixel_values=batch["generation_pixel_values"],
            orders=given["orders"],
            mask=given["mask"],
            timesteps=given["t"],
            noise=given["noise"],
        )
    assert out.loss_i2t is None and out.logits is None
    name = "loss_text2image.safetensors"
    assert_fixture_close(out.loss_t2i.reshape(1), name, "loss")
    assert_fixture_close(out.loss.reshape(1), name, "loss")
    assert abs(out.loss_t2i.item() - facts["loss"]) < 3e-5
    b, length = given["mask"].shape
    assert_fixture_close(parts["latents"], name, "latents")
    assert_fixture_close(parts["x_enc"], name, "mar_x_enc")
    assert_fixture_close(parts["z_enc"], name, "z_enc")
    assert_fixture_close(parts["position_ids"], name, "position_ids")
    assert_fixture_close(parts["llm_hidden"], name, "llm_image_hidden")
    assert_fixture_close(parts["x_enc_residual"], name, "x_enc")
    assert_fixture_close(parts["z"], name, "z")
    assert_fixture_close(parts["target"], name, "diffusion_target")
    assert_fixture_close(parts["cond"], name, "diffusion_cond")
    assert_fixture_close(parts["diffusion_mask"], name, "diffusion_mask")
    assert_fixture_close(parts["x_t"], name, "x_t")
    assert_fixture_close(parts["loss_mse"], name, "loss_mse")
    assert_fixture_close(parts["loss_vb"], name, "loss_vb")
    assert_fixture_close(parts["loss_mse"] + parts["loss_vb"], name, "loss_terms")
    # Orders alone (no explicit mask) with the recorded mask ratio give the same mask.
    assert int(given["mask"][0].sum()) == facts["num_masked"] == int(np.ceil(length * facts["mask_rate"]))
    assert b == 2


def test_collator_unconditional_replacement(processor):
    examples = [
        {"task": TEXT_TO_IMAGE, "pixel_values": torch.zeros(3, 64, 64), "caption": f"caption {i}", "seed": i}
        for i in range(200)
    ]
    dropped = HarmonDataCollator(processor, unconditional_prob=1.0).drop_captions(examples[:3])
    assert dropped == [None, None, None]
    assert HarmonDataCollator(processor, unconditional_prob=0.0).drop_captions(examples[:3]) == [
        "caption 0",
        "caption 1",
        "caption 2",
    ]
    # An injected generator decides exactly as its uniform draws say.
    draws = torch.rand(200, generator=torch.Generator().manual_seed(7))
    collator = HarmonDataCollator(processor, unconditional_prob=0.1, generator=torch.Generator().manual_seed(7))
    prompts = collator.drop_captions(examples)
    assert [p is None for p in prompts] == (draws < 0.1).tolist()
    assert 5 <= sum(p is None for p in prompts) <= 40
    # Without a generator the per-example seeds decide (reproducible).
    seeded = HarmonDataCollator(processor, unconditional_prob=0.1)
    assert seeded.drop_captions(examples) == seeded.drop_captions(examples)
    batch = HarmonDataCollator(processor, unconditional_prob=1.0)(examples[:2])
    uncond = processor.build_t2i_prompts([None, None], add_unconditional=False)
    assert torch.equal(batch["generation_input_ids"], uncond["input_ids"])


def test_collator_truncates_long_captions(processor):
    collator = HarmonDataCollator(processor, unconditional_prob=0.0, t2i_max_length=30)
    example = {"task": TEXT_TO_IMAGE, "pixel_values": torch.zeros(3, 64, 64), "caption": "a red cube " * 40}
    batch = collator([example])
    assert batch["generation_input_ids"].shape[1] <= 30
    text = processor.tokenizer.decode(batch["generation_input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n") and "Generate an image: a red cube" in text


def test_collator_prompt_rows_match_the_processor(processor):
    """The collator keeps each caption's token row; the batch equals the processor's own batch, with repeated,
    dropped and over-long captions, and again when every row comes from the kept ones."""
    collator = HarmonDataCollator(processor, unconditional_prob=0.0, t2i_max_length=24)
    captions = ["a red cube", "two blue circles", "a red cube", None, "a green cube " * 20, ""]
    examples = [{"task": TEXT_TO_IMAGE, "pixel_values": torch.zeros(3, 64, 64), "caption": c} for c in captions]
    collator.drop_captions = lambda exs: [ex["caption"] for ex in exs]  # keep the None entry as given
    expected = processor.build_t2i_prompts([collator._truncate(c) for c in captions], add_unconditional=False)
    for _ in range(2):
        batch = collator(examples)
        assert torch.equal(batch["generation_input_ids"], expected["input_ids"])
        assert torch.equal(batch["generation_attention_mask"], expected["attention_mask"])
    assert len(collator._rows) == 5  # one per distinct caption


# ------------------------------------------------------------------------------------------------------------------
# data sources
# ------------------------------------------------------------------------------------------------------------------
def test_upstream_layout_sources(tmp_path, processor):
    images = tmp_path / "images"
    captions = tmp_path / "captions"
    images.mkdir()
    captions.mkdir()
    for name, rgb in list(COLORS.items())[:3]:
        _shape_image(rgb).save(images / f"{name}.png")
        (captions / f"{name}.json").write_text(json.dumps({"caption": f"a {name} box", "other": "x"}))
    (tmp_path / "list.json").write_text(
        json.dumps([{"image": f"{n}.png", "annotation": f"{n}.json"} for n in list(COLORS)[:3]])
    )
    (tmp_path / "data_info.json").write_text(
        json.dumps(
            {"data_path": "list.json", "local_folder": "images", "cap_folder": "captions", "cap_source": "caption"}
        )
    )
    sources = load_source(tmp_path / "data_info.json")
    assert len(sources) == 1 and len(sources[0]) == 3
    assert load_source(tmp_path)[0].record(1).annotation == str(captions / "green.json")
    ds = ImageTextDataset(sources, TEXT_TO_IMAGE, processor.image_processor, resolution=64)
    example = ds[(0, 123)]
    assert example["caption"] == "a red box" and example["pixel_values"].shape == (3, 64, 64)
    assert torch.equal(ds[(0, 123)]["pixel_values"], example["pixel_values"])  # seeded crop: reproducible

    # a folder of JSON lists with inline captions and LLaVA conversations, images next to them
    lists = tmp_path / "lists"
    lists.mkdir()
    _shape_image(COLORS["blue"]).save(lists / "blue.png")
    (lists / "a.json").write_text(json.dumps([{"image": "blue.png", "caption": ["a blue box", "blue thing"]}]))
    llava = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Blue."}]
    (lists / "b.json").write_text(json.dumps([{"image": "blue.png", "conversations": llava}]))
    i2t = ImageTextDataset(load_source(lists), IMAGE_TO_TEXT, processor.image_processor, resolution=64)
    assert len(i2t) == 2
    caption_example = i2t[(0, 5)]
    assert caption_example["conversation"][1]["content"] in ("a blue box", "blue thing")
    assert caption_example["conversation"][0]["content"][1]["text"] in i2t.caption_prompts
    assert i2t[1]["conversation"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "Blue."},
    ]
    assert i2t[1]["pixel_values"].shape == (3, 64, 64)
    t2i = ImageTextDataset(load_source(lists), TEXT_TO_IMAGE, processor.image_processor, resolution=64)
    assert t2i[1]["caption"] == "Blue."


def test_image_folder_and_hf_datasets_sources(tmp_path, processor):
    folder = make_shapes_folder(tmp_path / "shapes", broken=False)
    (source,) = load_source(folder)
    assert len(source) == len(COLORS) and source.text_column == "text"
    datasets = pytest.importorskip("datasets")
    images = [PIL.Image.open(folder / f"{n}.png").convert("RGB") for n in COLORS]
    hf = datasets.Dataset.from_dict({"image": images, "caption": [f"a {n} box" for n in COLORS]})
    hf = hf.cast_column("image", datasets.Image())
    (hf_source,) = load_source(hf)
    assert (hf_source.image_column, hf_source.text_column) == ("image", "caption")
    hf.save_to_disk(str(tmp_path / "saved"))
    for spec in (hf, tmp_path / "saved"):
        ds = build_task_dataset([spec], TEXT_TO_IMAGE, processor.image_processor, resolution=64, t2i_crop="center")
        reference = ImageTextDataset(
            [source], TEXT_TO_IMAGE, processor.image_processor, resolution=64, t2i_crop="center"
        )
        assert ds[2]["caption"] == "a blue box"
        torch.testing.assert_close(ds[2]["pixel_values"], reference[2]["pixel_values"])


def test_broken_and_tiny_images_are_skipped_and_counted(tmp_path, processor, caplog):
    folder = make_shapes_folder(tmp_path / "shapes")
    ds = build_task_dataset([folder], IMAGE_TO_TEXT, processor.image_processor, resolution=64, min_image_size=16)
    n = len(COLORS)
    with caplog.at_level("WARNING"):
        corrupt, tiny = ds[n], ds[n + 1]
    assert corrupt["num_skipped"] >= 1 and tiny["num_skipped"] >= 1
    assert corrupt["index"] < n and tiny["index"] < n
    assert "corrupt.png" in caplog.text and "tiny.png" in caplog.text and "below 16 px" in caplog.text
    assert ds[0]["num_skipped"] == 0
    batch = HarmonDataCollator(processor)([ds[0], corrupt, tiny])
    assert batch["num_skipped_images"] == corrupt["num_skipped"] + tiny["num_skipped"]
    assert batch["pixel_values"].shape == (3, 3, 64, 64)


# ------------------------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------------------------
def test_task_ratio_parsing():
    assert parse_task_ratio("image2text:1,text2image:4") == {"image2text": 1, "text2image": 4}
    assert parse_task_ratio("t2i=2, i2t=0") == {"text2image": 2}
    assert parse_task_ratio({"i2t": 1}) == {"image2text": 1}
    for bad in ("foo:1", "i2t:1.5", "i2t:0", "i2t"):
        with pytest.raises(ValueError):
            parse_task_ratio(bad)


def test_mixed_sampler_ratio_ranks_and_determinism():
    sizes = {IMAGE_TO_TEXT: 24, TEXT_TO_IMAGE: 96}  # 3 cycles of 1 + 4 steps, 2 ranks x 4 examples
    world = 2
    sampler = MixedTaskBatchSampler(sizes, batch_size=4, ratio="i2t:1,t2i:4", num_replicas=world, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(sampler) % (sampler.cycle_length * world) == 0
    # steps (groups of `world` batches) follow the 1:4 cycle; a step's batches share one task
    steps = [batches[i : i + world] for i in range(0, len(batches), world)]
    tasks = [step[0][0][0] for step in steps]
    assert all({key[0] for batch in step for key in batch} == {task} for step, task in zip(steps, tasks))
    assert tasks[:5] == [IMAGE_TO_TEXT] + [TEXT_TO_IMAGE] * 4
    assert tasks.count(TEXT_TO_IMAGE) == 4 * tasks.count(IMAGE_TO_TEXT)
    # within a step the ranks see different examples; every generation example shows up in the epoch
    for step in steps:
        indices = [key[1] for batch in step for key in batch]
        assert len(set(indices)) == len(indices)
    for task, size in sizes.items():
        assert sorted(key[1] for b in batches for key in b if key[0] == task) == list(range(size))
    # accelerate's BatchSamplerShard hands every rank one batch of each step
    from accelerate.data_loader import BatchSamplerShard

    shards = [list(BatchSamplerShard(sampler, num_processes=world, process_index=r)) for r in range(world)]
    assert shards[0] == batches[0::2] and shards[1] == batches[1::2]
    assert list(sampler) == batches  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches
    random_order = MixedTaskBatchSampler(sizes, 4, "i2t:1,t2i:4", seed=3, order="random")
    cycle_tasks = [b[0][0] for b in random_order][:5]
    assert sorted(cycle_tasks) == sorted([IMAGE_TO_TEXT] + [TEXT_TO_IMAGE] * 4)
    only_gen = MixedTaskBatchSampler({TEXT_TO_IMAGE: 10}, 4, "i2t:1,t2i:4")
    assert {b[0][0] for b in only_gen} == {TEXT_TO_IMAGE}


def test_length_grouped_sampler_keeps_the_pass_and_cuts_padding():
    """group_by_length: the same examples in a pass over the data, batches of similar length, reproducible; the
    tasks without lengths keep their ungrouped batches."""
    sizes = {IMAGE_TO_TEXT: 64, TEXT_TO_IMAGE: 64}
    lengths = [(7 * i) % 23 + (40 if i % 2 else 0) for i in range(64)]  # short and long conversations, mixed
    kwargs = dict(batch_size=4, ratio="i2t:1,t2i:1", seed=5)
    plain = list(MixedTaskBatchSampler(sizes, **kwargs))
    grouped_sampler = MixedTaskBatchSampler(sizes, lengths={IMAGE_TO_TEXT: lengths}, group_size=4, **kwargs)
    grouped = list(grouped_sampler)

    def of(batches, task):
        return [[key[1] for key in b] for b in batches if b[0][0] == task]

    # every understanding example once per pass, as without grouping; generation untouched
    assert sorted(i for b in of(grouped, IMAGE_TO_TEXT) for i in b) == list(range(64))
    assert of(grouped, TEXT_TO_IMAGE) == of(plain, TEXT_TO_IMAGE)

    # the padding a batch needs (its longest minus its members) falls
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(of(grouped, IMAGE_TO_TEXT)) < 0.5 * padding(of(plain, IMAGE_TO_TEXT))
    # the seed stream is that of the ungrouped run, position by position; the order is reproducible
    assert [[k[2] for k in b] for b in grouped] == [[k[2] for k in b] for b in plain]
    assert list(grouped_sampler) == grouped
    with pytest.raises(ValueError, match="lengths\\['image2text'\\] has 3 entries for 64"):
        MixedTaskBatchSampler(sizes, lengths={IMAGE_TO_TEXT: [1, 2, 3]}, **kwargs)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        MixedTaskBatchSampler(sizes, lengths={IMAGE_TO_TEXT: lengths}, group_size=0, **kwargs)


def test_sampling_strategy_options(tmp_path, processor):
    """train_sampling_strategy reaches the mixed-task sampler: group_by_length groups the understanding batches by
    text length (conversations vs captions), sequential keeps the data order; unsupported values are refused."""
    folder = make_shapes_folder(tmp_path / "shapes", broken=False)
    grouped = run_trainer(tmp_path / "g", folder, processor, 2, train_sampling_strategy="group_by_length")
    grouped.get_train_dataloader()
    sampler = grouped.train_batch_sampler
    assert set(sampler.lengths) == {IMAGE_TO_TEXT}
    i2t = grouped.train_dataset.datasets[IMAGE_TO_TEXT]
    assert sampler.lengths[IMAGE_TO_TEXT] == [len(i2t.record(i).text) for i in range(len(i2t))]
    both = run_trainer(
        tmp_path / "b", folder, processor, 2, train_sampling_strategy="group_by_length", group_by_length_tasks="i2t,t2i"
    )
    both.get_train_dataloader()
    assert set(both.train_batch_sampler.lengths) == {IMAGE_TO_TEXT, TEXT_TO_IMAGE}
    sequential = run_trainer(tmp_path / "s", folder, processor, 2, train_sampling_strategy="sequential")
    sequential.get_train_dataloader()
    first = next(iter(sequential.train_batch_sampler))
    assert [key[1] for key in first] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="train_sampling_strategy='batch_rebalance' is not supported"):
        run_trainer(
            tmp_path / "r", folder, processor, 2, train_sampling_strategy="batch_rebalance"
        ).get_train_dataloader()
    with pytest.raises(ValueError, match="unknown tasks \\['captions'\\]"):
        HarmonTrainingArguments(output_dir=str(tmp_path / "x"), group_by_length_tasks="i2t,captions")


# ------------------------------------------------------------------------------------------------------------------
# (5) stages: freezing by preset, optimizer groups
# ------------------------------------------------------------------------------------------------------------------
def test_stage_presets_freeze_the_right_parameters():
    import yaml

    model = tiny_model()

    def size(prefixes: tuple[str, ...]) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))

    vae = size(("model.vae.",))
    llm = size(("model.language_model.",))  # lm_head is tied to the embedding
    mar = size(("model.mar.",))
    head = size(("model.diffusion_head.",))
    projectors = size(("model.proj_in.", "model.proj_out."))
    decoder = size(
        tuple(
            f"model.mar.{p}"
            for p in (
                "decoder_embed.",
                "mask_token",
                "decoder_pos_embed_learned",
                "decoder_blocks.",
                "decoder_norm.",
                "diffusion_pos_embed_learned",
            )
        )
    )
    total = count_parameters(model)["total"]
    assert total == vae + llm + mar + head + projectors and 0 < decoder < mar
    expected = {
        "stage1_alignment": mar + head + projectors,
        "stage2_full": total - vae,
        "stage3_high_quality": total - vae,
        "decoder_only": decoder,
    }
    for preset, trainable in expected.items():
        config = yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text())
        counts = set_trainable_modules(model, config["trainable_modules"])
        assert counts["trainable"] == trainable, preset
        assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.vae."))
        if preset == "stage1_alignment":
            assert not model.lm_head.weight.requires_grad
            assert config["image_size"] == 256
        if preset == "stage3_high_quality":
            assert config["image_size"] == 512
    with pytest.raises(ValueError, match="VAE"):
        set_trainable_modules(model, ["vae"])
    with pytest.raises(ValueError, match="match no parameter"):
        set_trainable_modules(model, ["model.nothing."])


@requires_scheduler
def test_stage1_training_leaves_frozen_parts_unchanged(tmp_path, processor):
    """Stage I with activation checkpointing: the LLM and the VAE keep their weights, the MAR and projectors move."""
    folder = make_shapes_folder(tmp_path / "shapes", broken=False)
    trainer = run_trainer(tmp_path / "out", folder, processor, steps=4, activation_checkpointing=True)
    counts = set_trainable_modules(trainer.model, ["mar", "diffusion_head", "projectors"])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.model.model.language_model.is_activation_checkpointing
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith(("model.language_model.", "model.vae.")) for n in changed)
    assert any(n.startswith("model.mar.encoder_blocks.") for n in changed)
    assert any(n.startswith("model.mar.decoder_blocks.") for n in changed)
    assert any(n.startswith("model.proj_in.") for n in changed) and any(
        n.startswith("model.proj_out.") for n in changed
    )
    assert counts["trainable"] == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def test_weight_decay_groups(tmp_path, processor):
    folder = make_shapes_folder(tmp_path / "shapes", broken=False)
    trainer = run_trainer(tmp_path / "out", folder, processor, steps=1)
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    named = dict(trainer.model.named_parameters())
    assert "model.mar.encoder_blocks.0.attn.qkv.weight" in decay
    assert "model.language_model.embed_tokens.weight" in decay
    assert "model.mar.encoder_pos_embed_learned" in decay  # (1, L, C): not 1-D
    assert not any("diffusion_head." in n for n in decay)
    assert not any(n.endswith(".bias") or named[n].ndim < 2 for n in decay)
    optimizer = trainer.create_optimizer()
    groups = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    assert groups[0.02] == sum(named[n].numel() for n in decay if named[n].requires_grad)
    assert optimizer.defaults["betas"] == (0.9, 0.95)


# ------------------------------------------------------------------------------------------------------------------
# (2) the losses fall; (3) resume = uninterrupted run
# ------------------------------------------------------------------------------------------------------------------
@requires_scheduler
@pytest.mark.slow
def test_tiny_training_losses_fall_by_half(tmp_path, processor):
    folder = make_shapes_folder(tmp_path / "shapes")
    trainer = run_trainer(tmp_path / "out", folder, processor, steps=300, logging_steps=10)
    trainer.train()
    history = trainer.state.log_history
    for key in ("loss_i2t", "loss_t2i"):
        values = [v for _, v in task_losses(history, key)]
        assert len(values) == 30, key
        first, last = values[0], float(np.mean(values[-3:]))
        assert last < 0.5 * first, (key, first, last)
    assert history[-2]["skipped_images"] > 0  # the corrupt and tiny images were replaced, and counted


@requires_scheduler
def test_resume_continues_with_identical_losses(tmp_path, processor):
    # 8 examples per task (2 broken), 4 per batch, 1:1 -> 4 steps per epoch; the checkpoint at step 6 is mid-epoch 1,
    # so the resumed run has to skip batches of the second epoch's order.
    folder = make_shapes_folder(tmp_path / "shapes")
    common = dict(save_strategy="steps", save_steps=3)
    full = run_trainer(tmp_path / "full", folder, processor, steps=8, **common)
    full.train()
    interrupted = run_trainer(tmp_path / "part", folder, processor, steps=8, **common)
    interrupted.args.max_steps = 6  # stop at the second checkpoint, as if killed there
    interrupted.train()
    assert (tmp_path / "part" / "checkpoint-6").is_dir()
    resumed = run_trainer(tmp_path / "part", folder, processor, steps=8, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    for key in ("loss_i2t", "loss_t2i", "loss"):
        expected = [(s, v) for s, v in task_losses(full.state.log_history, key) if s > 6]
        got = [(s, v) for s, v in task_losses(resumed.state.log_history, key) if s > 6]
        assert len(expected) >= 1 and [s for s, _ in got] == [s for s, _ in expected], key
        # values only: pytest >= 9.2's approx refuses (step, value) pairs
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-7), key
    assert [s for s, _ in task_losses(resumed.state.log_history, "loss") if s > 6] == [7, 8]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------------------------
# latent cache, examples/train.py, (4) 2-process run
# ------------------------------------------------------------------------------------------------------------------
@requires_scheduler
def test_latent_cache_gives_the_same_loss(tmp_path, processor):
    folder = make_shapes_folder(tmp_path / "shapes")
    model = tiny_model().eval()
    ds = build_task_dataset([folder], TEXT_TO_IMAGE, processor.image_processor, resolution=64, t2i_crop="center")
    pixels_batch = HarmonDataCollator(processor, unconditional_prob=0.0)([ds[i] for i in range(4)])
    cache = attach_latent_cache(model, ds, tmp_path / "cache")
    assert int(cache.valid.sum()) == len(COLORS) and len(cache) == len(ds)
    cached_batch = HarmonDataCollator(processor, unconditional_prob=0.0)([ds[i] for i in range(4)])
    assert "generation_image_tokens" in cached_batch and "generation_pixel_values" not in cached_batch
    with torch.no_grad():
        tokens = model.encode_images(pixels_batch["generation_pixel_values"])
    torch.testing.assert_close(cached_batch["generation_image_tokens"], tokens, atol=1e-6, rtol=1e-6)
    losses = []
    for batch in (pixels_batch, cached_batch):
        batch = {k: v for k, v in batch.items() if k != "num_skipped_images"}
        with torch.no_grad():
            losses.append(model(**batch, generator=torch.Generator().manual_seed(0)).loss_t2i.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # the broken examples are substituted, the cache file is reused
    assert ds[len(COLORS)]["num_skipped"] >= 1
    assert attach_latent_cache(model, ds, tmp_path / "cache").path == cache.path


def test_latent_cache_runs_the_vae_where_the_vae_is(tmp_path, processor):
    """examples/train.py moves only the VAE to the accelerator for the cache pass: the pictures must go to the VAE's
    device, not to the first parameter's (found on a GPU, where it crashed). Here the rest of the model sits on the
    meta device, so encoding on the wrong device would fail."""
    folder = make_shapes_folder(tmp_path / "shapes", broken=False)
    model = tiny_model().eval()
    ds = build_task_dataset([folder], TEXT_TO_IMAGE, processor.image_processor, resolution=64, t2i_crop="center")
    reference = attach_latent_cache(model, ds, tmp_path / "reference")
    expected = [reference.get(i) for i in range(len(ds))]
    vae = copy.deepcopy(model.model.vae)
    model.to("meta")
    model.model.vae = vae
    assert next(model.parameters()).device.type == "meta"
    cache = attach_latent_cache(model, ds, tmp_path / "cache")
    assert all(t is not None for t in expected)
    for index, tokens in enumerate(expected):
        torch.testing.assert_close(cache.get(index), tokens)


def _t2i_inputs(processor) -> dict[str, torch.Tensor]:
    """`text_to_image_loss` inputs of two random 64 px pictures with short captions."""
    examples = [
        {"task": TEXT_TO_IMAGE, "pixel_values": torch.rand(3, 64, 64) * 2 - 1, "caption": f"shape {i}"}
        for i in range(2)
    ]
    batch = HarmonDataCollator(processor, unconditional_prob=0.0)(examples)
    return dict(
        input_ids=batch["generation_input_ids"],
        attention_mask=batch["generation_attention_mask"],
        pixel_values=batch["generation_pixel_values"],
    )


def test_min_snr_weighting_of_the_text_to_image_loss(processor):
    """`diffusion_head_config.snr_gamma` weighs each row's noise MSE by min(SNR, gamma) / SNR and leaves the VB term:
    the loss equals that sum computed from the returned terms, an unreachable gamma gives upstream's loss, and a bad
    gamma is refused by the config."""
    base = tiny_model().eval()
    inputs = _t2i_inputs(processor)
    results = {}
    for gamma in (None, 5.0, 1e30):
        config = HarmonConfig.from_dict({**base.config.to_dict()})
        config.diffusion_head_config.snr_gamma = gamma
        model = HarmonForConditionalGeneration(config).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            results[gamma] = model.text_to_image_loss(**inputs, generator=torch.Generator().manual_seed(3))
    plain, weighted = results[None], results[5.0]
    torch.testing.assert_close(weighted["loss_mse"], plain["loss_mse"])  # the same rows, timesteps and noise
    alphas = base.train_scheduler.train_tables.alphas_cumprod[weighted["timesteps"]]
    snr = alphas / (1 - alphas)
    weights = torch.minimum(snr, torch.tensor(5.0, dtype=snr.dtype)) / snr
    assert weights.min() < 0.5 and weights.max() == 1.0  # both kinds of rows are present
    mask = weighted["diffusion_mask"]
    expected = ((weighted["loss_mse"] * weights.float() + weighted["loss_vb"]) * mask).sum() / mask.sum()
    torch.testing.assert_close(weighted["loss"], expected)
    assert weighted["loss"] < plain["loss"]
    torch.testing.assert_close(results[1e30]["loss"], plain["loss"])
    for bad in (0.0, -1.0, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="snr_gamma"):
            HarmonConfig.from_dict({**base.config.to_dict(), "diffusion_head_config": {"snr_gamma": bad}})


def test_x0_readout_loss_adds_a_direct_term_on_the_conditions(processor):
    """`diffusion_head_config.x0_readout_weight` builds a linear read-out of the clean token from each condition and
    adds its masked-token MSE, times the weight, to the diffusion loss of the same draws; without it the head has no
    read-out (converted checkpoints keep upstream's keys); its gradient reaches the MAR; bad weights are refused."""
    base = tiny_model().eval()
    assert base.model.diffusion_head.x0_readout is None
    assert not any("x0_readout" in key for key in base.state_dict())
    inputs = _t2i_inputs(processor)
    config = HarmonConfig.from_dict({**base.config.to_dict()})
    config.diffusion_head_config.x0_readout_weight = 0.5
    model = HarmonForConditionalGeneration(config).eval()
    incompatible = model.load_state_dict(base.state_dict(), strict=False)
    assert sorted(incompatible.missing_keys) == [
        "model.diffusion_head.x0_readout.bias",
        "model.diffusion_head.x0_readout.weight",
    ]
    plain = base.text_to_image_loss(**inputs, generator=torch.Generator().manual_seed(3))
    result = model.text_to_image_loss(**inputs, generator=torch.Generator().manual_seed(3))
    assert plain["loss_x0"] is None
    torch.testing.assert_close(result["z"], plain["z"])  # the same draws and the same network up to the read-out
    b, length, c = result["latents"].shape
    readout = model.model.diffusion_head.x0_readout
    error = (readout(result["z"].reshape(b * length, -1)) - result["latents"].reshape(b * length, c)).pow(2).mean(-1)
    mask = result["mask"].reshape(-1)
    assert mask.sum() > 0
    expected_x0 = (error * mask).sum() / mask.sum()
    torch.testing.assert_close(result["loss_x0"], expected_x0)
    torch.testing.assert_close(result["loss"], plain["loss"] + 0.5 * expected_x0)
    # the term trains the path the conditions come from, not only the read-out
    result["loss_x0"].backward()
    assert model.model.mar.diffusion_pos_embed_learned.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0  # and the prompt's way into them
    assert readout.weight.grad.abs().sum() > 0
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="x0_readout_weight"):
            HarmonConfig.from_dict({**base.config.to_dict(), "diffusion_head_config": {"x0_readout_weight": bad}})


@requires_scheduler
def test_understanding_latent_cache_gives_the_same_loss(tmp_path, processor, caplog):
    """Understanding data cached: one VAE pass per distinct picture (two sources share the files), tokens copied
    from the generation cache where the preprocessed pixels agree (square pictures) and encoded where they do not
    (padding vs centre crop); the batch gives the loss of the uncached one; bad inputs are refused."""
    from harmon_hf.training.latents import LatentCache, cache_file

    rect = make_shapes_folder(tmp_path / "rect", broken=False)  # 80x64 / 88x64: padding != centre crop
    square = tmp_path / "square"
    square.mkdir()
    with open(square / "metadata.jsonl", "w") as f:
        for i, (name, rgb) in enumerate(COLORS.items()):
            _shape_image(rgb, (64, 64), i).save(square / f"{name}.png")
            f.write(json.dumps({"file_name": f"{name}.png", "text": f"a {name} box"}) + "\n")
    model = tiny_model().eval()
    collate = HarmonDataCollator(processor, unconditional_prob=0.0)
    n = len(COLORS)
    for folder, copied in ((rect, 0), (square, n)):
        cache_dir = tmp_path / f"cache-{folder.name}"
        t2i = build_task_dataset([folder], TEXT_TO_IMAGE, processor.image_processor, resolution=64, t2i_crop="center")
        i2t = build_task_dataset([folder, folder], IMAGE_TO_TEXT, processor.image_processor, resolution=64)
        keys = [(i, i + 11) for i in range(len(i2t))]
        pixels_batch = collate([i2t[k] for k in keys])
        attach_latent_cache(model, t2i, cache_dir)
        with caplog.at_level(logging.INFO, logger="harmon_hf.training.latents"):
            cache = attach_latent_cache(model, i2t, cache_dir, reuse=[t2i])
        assert f"({n} pictures: {n - copied} encoded, {copied} copied" in caplog.text
        caplog.clear()
        assert cache.path == cache_file(cache_dir, 64, IMAGE_TO_TEXT) and len(cache) == 2 * n
        assert cache.rows.tolist() == list(range(n)) * 2  # the second source reuses the first's rows
        with safe_open(str(cache.path), framework="pt") as f:
            assert f.get_slice("tokens").get_shape()[0] == n
        cached_batch = collate([i2t[k] for k in keys])
        assert "image_tokens" in cached_batch and "pixel_values" not in cached_batch
        assert cached_batch["input_ids"].equal(pixels_batch["input_ids"])
        with torch.no_grad():
            tokens = model.encode_images(pixels_batch["pixel_values"])
        torch.testing.assert_close(cached_batch["image_tokens"], tokens, atol=1e-6, rtol=1e-6)
        generation_tokens = torch.stack([t2i[i]["image_tokens"] for i in range(n)])
        assert torch.equal(cached_batch["image_tokens"][:n], generation_tokens) == bool(copied)
        losses = []
        for batch in (pixels_batch, cached_batch):
            batch = {k: v for k, v in batch.items() if k != "num_skipped_images"}
            with torch.no_grad():
                losses.append(model(**batch).loss_i2t.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        # reopened, not rebuilt; a cache made for other data is refused, naming both
        assert attach_latent_cache(model, i2t, cache_dir).rows.equal(cache.rows)
        one_source = build_task_dataset([folder], IMAGE_TO_TEXT, processor.image_processor, resolution=64)
        with pytest.raises(ValueError, match="was built for .*'num_examples': '12'.*'num_examples': '6'"):
            attach_latent_cache(model, one_source, cache_dir)
    pixels_example = {k: v for k, v in i2t[keys[1]].items() if k != "image_tokens"}
    pixels_example["pixel_values"] = torch.zeros(3, 64, 64)
    with pytest.raises(ValueError, match="mixes cached latents and pixels"):
        collate([i2t[keys[0]], pixels_example])
    # a cache file of the first format (text-to-image rows per example + a valid mask) still reads
    legacy = tmp_path / "legacy.safetensors"
    save_file(
        {"tokens": torch.arange(24, dtype=torch.float32).reshape(3, 2, 1, 4), "valid": torch.tensor([1, 0, 1]).byte()},
        str(legacy),
        metadata={"resolution": "32", "num_examples": "3", "crop": "center"},
    )
    old = LatentCache(legacy)
    assert old.rows.tolist() == [0, -1, 2] and old.get(1) is None and old.get(2)[1, 0, 0].item() == 20.0
    assert old.metadata["task"] == TEXT_TO_IMAGE


def test_understanding_forward_takes_image_tokens_or_pixels_not_both(processor):
    model = tiny_model().eval()
    inputs = processor(
        text="<image>\nWhat colour?", images=[_shape_image((220, 30, 30), (64, 64))], return_tensors="pt"
    )
    with torch.no_grad():
        tokens = model.encode_images(inputs["pixel_values"])
        from_pixels = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        from_tokens = model(input_ids=inputs["input_ids"], image_tokens=tokens).logits
    torch.testing.assert_close(from_tokens, from_pixels)
    with pytest.raises(ValueError, match="at most one of pixel_values, image_tokens and mm_encoder_outputs"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], image_tokens=tokens)


def cli(config: Path, **options) -> list[str]:
    """`config --key value ...` arguments for examples/train.py (list values become several words)."""
    args = [str(config)]
    for key, value in options.items():
        args.append(f"--{key}")
        args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return args


@requires_scheduler
def test_train_script_yaml_overrides_and_saved_folder(tmp_path):
    import train

    folder = make_shapes_folder(tmp_path / "shapes")
    out = tmp_path / "out"
    stage1 = ["mar", "diffusion_head", "projectors"]
    trainer = train.main(
        cli(
            CONFIGS / "tiny_cpu.yaml",
            processor_name_or_path=LLM_DIR,
            i2t_data=folder,
            t2i_data=folder,
            output_dir=out,
            max_steps=4,
            save_steps=2,
            logging_steps=2,
            trainable_modules=stage1,
            t2i_crop="center",
            latent_cache_dir=tmp_path / "cache",
            disable_tqdm="true",
        )
    )
    assert (tmp_path / "cache" / "latents_64px.safetensors").is_file()
    assert trainer.args.max_steps == 4 and trainer.args.learning_rate == 1e-3  # CLI override, YAML value
    logs = trainer.state.log_history
    assert task_losses(logs, "loss_i2t") and task_losses(logs, "loss_t2i")
    loaded = load_saved(out)
    for name, param in trainer.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], param, msg=name)
    processor = train.load_processor(out)
    assert processor.image_size == 64 and processor.buffer_size == 8
    # the saved folder is also a HarmonPipeline
    pipe = HarmonPipeline.from_pretrained(out)
    image = pipe(
        "a red circle", num_inference_steps=2, num_diffusion_steps=5, generator=torch.Generator().manual_seed(0)
    )
    assert image.images[0].size == (64, 64)
    for name, param in trainer.model.state_dict().items():
        torch.testing.assert_close(pipe.model.state_dict()[name], param, msg=name)
    # a second stage starts from the saved folder and resumes from its last checkpoint
    trainer2 = train.main(
        cli(
            CONFIGS / "tiny_cpu.yaml",
            model_name_or_path=out,
            i2t_data=folder,
            output_dir=out,
            max_steps=6,
            save_steps=100,
            resume_from_checkpoint="last",
            task_ratio="image2text:1",
            trainable_modules=stage1,
            disable_tqdm="true",
        )
    )
    assert trainer2.state.global_step == 6
    new_logs = [h for h in trainer2.state.log_history if h["step"] > 4 and "loss" in h]
    assert new_logs and all("loss_i2t" in h and "loss_t2i" not in h for h in new_logs)


TWO_PROCESS_SCRIPT = """
import sys, torch
sys.path.insert(0, {examples!r})
import train
trainer = train.main(sys.argv[1:])
rank = trainer.args.process_index
state = {{n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
result = {{"state": state, "log": trainer.state.log_history, "world": trainer.args.world_size}}
torch.save(result, {out!r} + f"/rank{{rank}}.pt")
"""


@requires_scheduler
@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_process_cpu_run(tmp_path, sharding):
    """torchrun, 2 CPU processes, gloo: both task losses logged (same values on both ranks), identical parameters on
    both ranks (DDP), a checkpoint that loads. FSDP2 shards the stage-I model (frozen LLM and VAE) the same way."""
    folder = make_shapes_folder(tmp_path / "shapes")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(examples=str(EXAMPLES), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    port = "29731" if sharding == "ddp" else "29732"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    extra = {}
    if sharding == "fsdp":
        extra = dict(
            fsdp="full_shard auto_wrap",
            fsdp_config=CONFIGS / "fsdp_config.json",
            trainable_modules=["mar", "diffusion_head", "projectors"],
        )
    options = cli(
        CONFIGS / "tiny_cpu.yaml",
        processor_name_or_path=LLM_DIR,
        i2t_data=folder,
        t2i_data=folder,
        output_dir=out,
        max_steps=4,
        logging_steps=2,
        save_steps=4,
        per_device_train_batch_size=2,
        ddp_backend="gloo",
        disable_tqdm="true",
        **extra,
    )
    result = subprocess.run([*launcher, str(script), *options], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    log = ranks[0]["log"]
    assert len(task_losses(log, "loss_i2t")) == 2 and len(task_losses(log, "loss_t2i")) == 2
    for key in ("loss_i2t", "loss_t2i", "skipped_images"):  # reduced over the ranks
        assert task_losses(log, key) == task_losses(ranks[1]["log"], key), key
    final = load_saved(out)
    checkpoint = load_saved(out / "checkpoint-4")
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    for name, value in final.state_dict().items():
        assert torch.equal(checkpoint.state_dict()[name], value), name
    if sharding == "ddp":
        for name, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][name]), name
            torch.testing.assert_close(final.state_dict()[name], value, msg=name)
