"""Harmon-Shapes: generator determinism and hold-out, caption/QA consistency, ShapesEval, tokenizer, tiny VAE."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from example_scripts import load_example

from harmon_hf.shapes.data import (
    KINDS,
    SLOT_JITTER,
    SLOTS,
    ObjectSpec,
    PromptSpec,
    ShapesWorld,
    make_scene,
    parse_prompt,
    write_dataset,
    write_ordered_captions,
)
from harmon_hf.shapes.eval import (
    DetectionAnswerer,
    ShapeDetector,
    evaluate,
    format_table,
    ground_truth_generate_fn,
    heldout_material,
    match_spec,
    normalize_answer,
    perturb_spec,
    score_image,
)
from harmon_hf.shapes.run_eval import WORLD_FILE, load_world

WORLD = ShapesWorld()


def _png_bytes(scene) -> bytes:
    buffer = io.BytesIO()
    scene.render(WORLD).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_and_other_seed_differs():
    for split in ("train", "test"):
        for i in range(6):
            a, b = make_scene(i, split, seed=3), make_scene(i, split, seed=3)
            assert _png_bytes(a) == _png_bytes(b)
            assert a.caption == b.caption and a.qa == b.qa
    first = [make_scene(i, "train", seed=0).caption for i in range(20)]
    other = [make_scene(i, "train", seed=1).caption for i in range(20)]
    assert first != other


def test_write_dataset_is_deterministic_and_complete(tmp_path):
    summaries = [write_dataset(tmp_path / name, 9, "train", seed=5) for name in ("a", "b")]
    assert _folder_digest(tmp_path / "a") == _folder_digest(tmp_path / "b")
    assert summaries[0]["num_images"] == 9
    out = tmp_path / "a"
    records = json.loads((out / "captions.json").read_text())
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    info = json.loads((out / "data_info.json").read_text())
    assert info["datasets"][0]["annotations"] == "captions.json"
    assert len(records) == len(rows) == 9
    for record, row in zip(records, rows):
        assert (out / record["image"]).is_file() and row["file_name"] == record["image"]
        assert row["text"] == record["caption"] and record["qa"] and len(record["qa"]) == len(record["qa_types"])
    conversations = json.loads((out / "conversations.json").read_text())
    assert len(conversations) == sum(len(r["qa"]) for r in records)
    assert conversations[0]["conversations"][0]["value"].startswith("<image>\n")
    multi = json.loads((out / "conversations_multiturn.json").read_text())
    assert len(multi) == 9 and all(len(m["conversations"]) == 2 * len(r["qa"]) for m, r in zip(multi, records))


def test_training_code_reads_the_layouts(tmp_path):
    training_data = pytest.importorskip("harmon_hf.training.data")
    write_dataset(tmp_path, 5, "train", seed=0)
    for spec in (tmp_path, tmp_path / "metadata.jsonl", tmp_path / "conversations.json"):
        sources = training_data.load_source(spec)
        assert sum(len(s) for s in sources) >= 5
    record = training_data.load_source(tmp_path)[0].record(0)
    assert record.text == json.loads((tmp_path / "captions.json").read_text())[0]["caption"]


def test_train_split_holds_nothing_held_out_and_test_pairs_are_unseen():
    train = [make_scene(i, "train", seed=0) for i in range(400)]
    assert not any(s.novel for s in train)
    for scene in train:
        assert not any((s.colour, s.shape) in WORLD.heldout_combos for s in scene.shapes)
        assert not WORLD.is_heldout(scene.spec)
    assert {s.spec.kind for s in train} == set(KINDS)
    assert any(make_scene(i, "all", seed=0).novel for i in range(100))  # the autoencoder's pictures cover everything
    train_captions = {s.caption for s in train}
    pairs = [make_scene(i, "test", seed=0, kind="pair") for i in range(40)]
    assert all(s.novel for s in pairs)
    assert not train_captions & {s.caption for s in pairs}
    # Both phrasings of a layout share its hold-out status.
    a, b = ObjectSpec("red", "circle"), ObjectSpec("blue", "square")
    assert WORLD.is_heldout_layout(PromptSpec("pair", (a, b), "left")) == WORLD.is_heldout_layout(
        PromptSpec("pair", (b, a), "right")
    )


def test_parse_prompt_round_trip():
    for kind in KINDS:
        for i in range(15):
            spec = make_scene(i, "test", seed=2, kind=kind).spec
            parsed = parse_prompt(spec.caption())
            if spec.kind == "count" and spec.count == 1:  # "one red circle" reads as a single object
                assert parsed == PromptSpec("single", spec.objects)
            else:
                assert parsed == spec
    assert parse_prompt("Two Red Circles.") == PromptSpec("count", (ObjectSpec("red", "circle"),), count=2)
    assert parse_prompt("a pink hexagon") is None


def test_ordered_phrasing_names_the_left_or_top_object_first():
    seen = set()
    for i in range(60):
        spec = make_scene(i, "train", seed=4, kind="pair").spec
        ordered = spec.ordered()
        seen.add(spec.relation)
        assert ordered.relation in ("left", "above") and ordered.ordered_pair() == spec.ordered_pair()
        assert ordered.objects[0] == spec.ordered_pair()[1]  # the object named first is the left / top one
        assert (ordered == spec) == (spec.relation in ("left", "above"))
        assert parse_prompt(ordered.caption()) == ordered and ordered.ordered() == ordered
    assert seen == {"left", "right", "above", "below"}
    for kind in ("single", "count"):
        spec = make_scene(0, "train", seed=4, kind=kind).spec
        assert spec.ordered() is spec


def test_ordered_captions_read_the_same_pictures(tmp_path):
    training_data = pytest.importorskip("harmon_hf.training.data")
    write_dataset(tmp_path, 40, "train", seed=1)
    records = json.loads((tmp_path / "captions.json").read_text())
    (plain,) = training_data.load_source(tmp_path)
    (ordered,) = training_data.load_source(tmp_path / "ordered")
    assert len(plain) == len(ordered) == 40
    flipped = 0
    for i, record in enumerate(records):
        a, b = plain.record(i), ordered.record(i)
        assert Path(a.image).resolve() == Path(b.image).resolve() and a.text == record["caption"]
        spec = PromptSpec.from_dict(record["spec"])
        assert b.text == spec.ordered().caption() == record["caption_ordered"]
        flipped += b.text != a.text
    assert flipped == sum(PromptSpec.from_dict(r["spec"]).relation in ("right", "below") for r in records) > 0
    # a folder written before ordered captions existed gains them, the same as written now
    expected = _folder_digest(tmp_path)
    for record in records:
        del record["caption_ordered"]
    (tmp_path / "captions.json").write_text(json.dumps(records))
    (tmp_path / "ordered" / "data_info.json").unlink()
    assert write_ordered_captions(tmp_path) == flipped
    assert _folder_digest(tmp_path) == expected


SLOTS_WORLD = ShapesWorld(layout="slots")


def test_slots_layout_puts_every_object_in_its_slot():
    for kind in KINDS:
        for i in range(15):
            scene = make_scene(i, "train", seed=6, kind=kind, world=SLOTS_WORLD)
            assert _png_bytes(scene) == _png_bytes(make_scene(i, "train", seed=6, kind=kind, world=SLOTS_WORLD))
            spec = scene.spec
            if spec.kind == "pair":
                slots, sizes = SLOTS["pair_h" if spec.axis == "h" else "pair_v"]
                # the caption's objects in its order; the first named sits left / above exactly when the relation
                # says so
                assert [(s.colour, s.shape) for s in scene.shapes] == [(o.colour, o.shape) for o in spec.objects]
                first_is_left_or_top = spec.relation in ("left", "above")
                centres = [(s.cx, s.cy) for s in scene.shapes]
                if not first_is_left_or_top:
                    centres = centres[::-1]
            else:
                slots, sizes = SLOTS["single"] if spec.kind == "single" else SLOTS[f"count{spec.count}"]
                centres = [(s.cx, s.cy) for s in scene.shapes]
                assert len(scene.shapes) == len(slots)
            for (x, y), (sx, sy) in zip(centres, slots):
                assert abs(x - sx) <= SLOT_JITTER + 1e-9 and abs(y - sy) <= SLOT_JITTER + 1e-9, (scene.caption, x, y)
            assert all(sizes[0] <= s.size <= sizes[1] for s in scene.shapes)
    # the default world is unchanged: its pictures are not the slots ones
    assert _png_bytes(make_scene(0, "train", seed=6)) != _png_bytes(make_scene(0, "train", seed=6, world=SLOTS_WORLD))


def test_world_layout_validation_and_round_trip():
    with pytest.raises(ValueError, match="'grid'"):
        ShapesWorld(layout="grid")
    with pytest.raises(ValueError, match=r"\['pairs'\]"):
        ShapesWorld(kind_weights={"pairs": 1.0})
    for bad in ({"pair": -1.0}, {"pair": 0.0}, {"pair": float("nan")}):
        with pytest.raises(ValueError, match="kind_weights must be finite"):
            ShapesWorld(kind_weights=bad)
    with pytest.raises(ValueError, match="max_count=4"):
        ShapesWorld(layout="slots", max_count=4)
    assert ShapesWorld.from_dict(json.loads(json.dumps(SLOTS_WORLD.to_dict()))) == SLOTS_WORLD
    old = SLOTS_WORLD.to_dict()
    del old["layout"]  # worlds saved before layouts existed
    assert ShapesWorld.from_dict(old).layout == "random"


def test_load_world_reads_the_model_folder(tmp_path):
    assert load_world(tmp_path) == ShapesWorld()  # no world file: the default world
    (tmp_path / WORLD_FILE).write_text(json.dumps(SLOTS_WORLD.to_dict()))
    assert load_world(tmp_path) == SLOTS_WORLD
    (tmp_path / WORLD_FILE).write_text(json.dumps({"layout": "slots"}))
    with pytest.raises(ValueError, match=WORLD_FILE):
        load_world(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# ShapesEval
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [WORLD, SLOTS_WORLD], ids=["random", "slots"])
def test_captions_and_answers_match_the_pictures(world):
    detector = ShapeDetector(world)
    answerer = DetectionAnswerer(detector)
    for split in ("train", "test"):
        for kind in KINDS:
            for i in range(12):
                scene = make_scene(i, split, seed=1, kind=kind, world=world)
                image = scene.render(world)
                result = match_spec(scene.spec, detector.detect(image))
                assert result["correct"], (scene.caption, result)
                for question, answer, _ in scene.qa:
                    assert normalize_answer(answerer(image, question)) == answer, (scene.caption, question)


def test_scorer_rejects_wrong_prompts():
    detector = ShapeDetector(WORLD)
    rng = random.Random(0)
    for kind in KINDS:
        for i in range(12):
            scene = make_scene(i, "test", seed=4, kind=kind)
            wrong = perturb_spec(scene.spec, rng, WORLD)
            assert wrong != scene.spec
            assert not match_spec(wrong, detector.detect(scene.render(WORLD)))["correct"], (scene.caption, wrong)
    blank = make_scene(0, "test", kind="single").render(WORLD).point(lambda _: 255)
    assert score_image(blank, "a red circle")["correct"] is False


def test_evaluate_in_the_slots_world_with_ground_truth():
    results = evaluate(
        ground_truth_generate_fn(SLOTS_WORLD), lambda image, q: "red", n=4, seed=9, world=SLOTS_WORLD, verbose=False
    )
    assert all(results["generation"][kind]["accuracy"] == 1.0 for kind in KINDS)


def test_evaluate_with_ground_truth_and_constant_answers(tmp_path):
    out = tmp_path / "eval.json"
    results = evaluate(
        ground_truth_generate_fn(WORLD), lambda image, q: "red", n=8, seed=9, out_json=out, verbose=False
    )
    for kind in KINDS:
        assert results["generation"][kind]["accuracy"] == 1.0
    assert results["targets"]["generation/single"]["passed"]
    assert results["understanding"]["overall"]["accuracy"] < 0.5
    assert not results["targets"]["understanding/shape"]["passed"]
    saved = json.loads(out.read_text())
    assert saved["generation"]["pair"]["n"] == 8 and len(saved["items"]["understanding"]) > 0


def test_heldout_material_splits_the_test_pairs_and_evaluate_reports_both():
    """Test pairs hold a held-out object or, with seen objects only, a held-out layout; `evaluate` reports both groups
    for generation and understanding, and they add up to the kind's scenes."""
    pairs = [make_scene(i, "test", seed=9, kind="pair") for i in range(60)]
    materials = [heldout_material(s, WORLD) for s in pairs]
    assert set(materials) == {"object", "layout"}
    for scene, material in zip(pairs, materials):
        has_object = any(WORLD.is_heldout_object(o) for o in scene.spec.objects)
        assert (material == "object") == has_object
        if material == "layout":
            assert WORLD.is_heldout_layout(scene.spec)
    assert all(heldout_material(make_scene(i, "train", 0), WORLD) is None for i in range(100))
    results = evaluate(ground_truth_generate_fn(WORLD), lambda image, q: "red", n=12, seed=9, verbose=False)
    pair = results["generation"]["pair"]
    assert pair["n_heldout_object"] + pair["n_heldout_layout"] == pair["n"] == 12
    assert pair["n_heldout_object"] == materials[:12].count("object")
    assert pair["heldout_object_accuracy"] == pair["heldout_layout_accuracy"] == 1.0
    single = results["generation"]["single"]
    assert single["n_heldout_layout"] == 0 and single["n_heldout_object"] == single["n_novel"]
    und = results["understanding"]
    assert und["kind:pair/heldout-object"]["n"] + und["kind:pair/heldout-layout"]["n"] == und["kind:pair"]["n"]
    items = [i for i in results["items"]["understanding"] if i["kind"] == "pair" and i["heldout"] == "layout"]
    expected = sum(i["correct"] for i in items) / len(items)
    assert und["kind:pair/heldout-layout"]["accuracy"] == pytest.approx(expected)
    assert "h.obj" in format_table(results)


def test_evaluate_on_the_train_distribution():
    """`split="train"`: new scenes with only seen objects and layouts (none novel), no targets; bad splits refused."""
    results = evaluate(
        ground_truth_generate_fn(SLOTS_WORLD),
        lambda image, q: "red",
        n=6,
        seed=9,
        world=SLOTS_WORLD,
        verbose=False,
        split="train",
    )
    assert all(results["generation"][kind]["accuracy"] == 1.0 for kind in KINDS)
    assert results["config"]["split"] == "train" and results["targets"] == {}
    assert not any(item["novel"] for item in results["items"]["understanding"])
    train_captions = {make_scene(i, "train", 0, world=SLOTS_WORLD).caption for i in range(200)}
    eval_scenes = [make_scene(i, "train", 9, kind, SLOTS_WORLD) for kind in KINDS for i in range(6)]
    assert all(not SLOTS_WORLD.is_heldout(scene.spec) for scene in eval_scenes)
    assert [s.render(SLOTS_WORLD).tobytes() for s in eval_scenes[:3]] != [
        make_scene(i, "train", 0, world=SLOTS_WORLD).render(SLOTS_WORLD).tobytes() for i in range(3)
    ]
    assert any(scene.caption in train_captions for scene in eval_scenes)  # seen prompts, new pictures
    with pytest.raises(ValueError, match="'validation'"):
        evaluate(None, lambda image, q: "red", n=1, split="validation", verbose=False)
    from harmon_hf.shapes.run_eval import evaluate_model

    with pytest.raises(ValueError, match="'validation'"):  # refused before the (here missing) folder is read
        evaluate_model("/nonexistent/model", n=1, split="validation")


def test_normalize_answer():
    assert normalize_answer(" Red.") == "red"
    assert normalize_answer("The circle!") == "circle"
    assert normalize_answer("2") == "two"
    assert normalize_answer("left\nbecause ...") == "left"


# ------------------------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from harmon_hf.shapes.tokenizer import save_tokenizer

    return save_tokenizer(tmp_path_factory.mktemp("shapes_tokenizer"))


def test_tokenizer_files_round_trip_and_conventions(tokenizer_dir):
    from transformers import AutoTokenizer

    assert {p.name for p in tokenizer_dir.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert 300 <= len(tok) <= 600
    assert tok.convert_ids_to_tokens(list(range(len(tok) - 3, len(tok)))) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.convert_tokens_to_ids("<image>") in (None, tok.unk_token_id)
    for text in ("a red circle to the left of a blue square", "What colour are the shapes?", "Zebra & 42 ünïcode"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("a red circle to the left of a blue square")["input_ids"]) == 10  # one token per word
    messages = [{"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "circle"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\ncircle<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)
    ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_tokenizer_is_deterministic(tokenizer_dir, tmp_path):
    from harmon_hf.shapes.tokenizer import save_tokenizer

    again = save_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_tokenizer_takes_the_image_token(tokenizer_dir):
    processing = pytest.importorskip("harmon_hf.processing_harmon")
    tok = processing.prepare_tokenizer(str(tokenizer_dir))
    assert tok.convert_tokens_to_ids("<image>") == len(tok) - 1 == 500


# ------------------------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------------------------
def test_vae_layout_and_a_few_steps_lower_the_loss():
    from harmon_hf.shapes.vae import build_vae, harmon_vae_kwargs, to_pixels, to_uint8, vae_loss

    torch.manual_seed(0)
    vae = build_vae((8, 8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    pixels = to_pixels(np.stack([np.asarray(make_scene(i, "train").render(WORLD)) for i in range(4)]))
    assert vae.encode(pixels).latent_dist.mean.shape == (4, 16, 4, 4)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):
        loss, parts = vae_loss(vae, pixels, generator=generator, foreground_weight=4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert set(parts) == {"l1", "mse", "kl"}
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert to_uint8(pixels).dtype == np.uint8
    kwargs = harmon_vae_kwargs(vae)
    configuration = pytest.importorskip("harmon_hf.configuration_harmon")
    config = configuration.HarmonVAEConfig(**kwargs)
    assert config.to_autoencoder_kwargs() == kwargs


def test_vae_without_attention_is_convolutions_only():
    """`attention=False` drops kl16's three self-attention layers (last encoder level, both mid blocks) and nothing
    else: same stride, latent size and convolution weights, and the Harmon config rebuilds the same layout."""
    from diffusers.models.attention_processor import Attention

    from harmon_hf.shapes.vae import VAETrainingConfig, build_vae, harmon_vae_kwargs

    assert VAETrainingConfig().attention is True
    widths = (8, 8, 16, 16, 16)
    with_attention = build_vae(widths, norm_num_groups=4)
    without = build_vae(widths, norm_num_groups=4, attention=False)
    assert sum(isinstance(m, Attention) for m in with_attention.modules()) == 3
    assert not any(isinstance(m, Attention) for m in without.modules())
    assert without.config.mid_block_add_attention is False
    assert without.config.down_block_types[-1] == "DownEncoderBlock2D"
    kept = {k: v.shape for k, v in with_attention.state_dict().items() if "attention" not in k}
    assert {k: v.shape for k, v in without.state_dict().items()} == kept
    pixels = torch.zeros(2, 3, 64, 64)
    assert without.encode(pixels).latent_dist.mean.shape == (2, 16, 4, 4)
    configuration = pytest.importorskip("harmon_hf.configuration_harmon")
    from diffusers import AutoencoderKL

    rebuilt = AutoencoderKL(**configuration.HarmonVAEConfig(**harmon_vae_kwargs(without)).to_autoencoder_kwargs())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == kept


def test_cut_and_paste_joins_two_pictures_at_a_token_boundary():
    from harmon_hf.shapes.vae import cut_and_paste

    pixels = torch.rand(3, 3, 64, 48)
    seen = set()
    for seed in range(30):
        mixed, source, (axis, cut) = cut_and_paste(pixels, generator=torch.Generator().manual_seed(seed))
        again = cut_and_paste(pixels, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(mixed, again[0]) and (axis, cut) == again[2]  # a function of the generator
        assert source.tolist() == [2, 0, 1]
        edge = 16 * cut
        if axis == "w":
            assert 1 <= cut <= 2
            assert torch.equal(mixed[..., :edge], pixels[..., :edge])
            assert torch.equal(mixed[..., edge:], pixels[source][..., edge:])
        else:
            assert axis == "h" and 1 <= cut <= 3
            assert torch.equal(mixed[..., :edge, :], pixels[..., :edge, :])
            assert torch.equal(mixed[..., edge:, :], pixels[source][..., edge:, :])
        seen.add((axis, cut))
    assert len(seen) == 5  # every cut of both axes is drawn
    with pytest.raises(ValueError, match="16 x 64"):
        cut_and_paste(torch.rand(2, 3, 16, 64))


def test_patch_locality_loss_is_zero_for_a_per_patch_encoder_and_scale_free():
    """An encoder that reads each 16 x 16 patch alone (average pooling) scores 0; one whose tokens also carry the
    whole picture's mean scores > 0, and the same after scaling its latents."""
    from harmon_hf.shapes.vae import cut_and_paste, patch_locality_loss

    def local(x):
        return torch.nn.functional.avg_pool2d(x, 16)

    def mixing(x):
        return local(x) + x.mean((2, 3), keepdim=True)

    pixels = torch.rand(4, 3, 64, 64) + torch.arange(4.0).view(4, 1, 1, 1)  # pictures of different brightness
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        mixed, source, cut = cut_and_paste(pixels, generator=generator)
        assert patch_locality_loss(local(pixels), local(mixed), source, cut).item() < 1e-12
        value = patch_locality_loss(mixing(pixels), mixing(mixed), source, cut)
        assert value.item() > 1e-3
        scaled = patch_locality_loss(5 * mixing(pixels), 5 * mixing(mixed), source, cut)
        torch.testing.assert_close(scaled, value)


def test_vae_loss_locality_term():
    """`locality_weight` adds weight x the locality of the same encoder call's means; 0 leaves the loss as it was."""
    from harmon_hf.shapes.vae import build_vae, cut_and_paste, patch_locality_loss, to_pixels, vae_loss

    torch.manual_seed(0)
    vae = build_vae((8, 8, 16, 16, 16), norm_num_groups=4)
    pixels = to_pixels(np.stack([np.asarray(make_scene(i, "train").render(WORLD)) for i in range(4)]))
    plain, plain_parts = vae_loss(vae, pixels, generator=torch.Generator().manual_seed(1))
    assert set(plain_parts) == {"l1", "mse", "kl"}
    assert plain.item() == pytest.approx(plain_parts["l1"] + plain_parts["mse"] + 1e-5 * plain_parts["kl"], rel=1e-5)
    weighted, parts = vae_loss(vae, pixels, generator=torch.Generator().manual_seed(1), locality_weight=2.0)
    assert set(parts) == {"l1", "mse", "kl", "locality"}
    generator = torch.Generator().manual_seed(1)
    mixed, source, cut = cut_and_paste(pixels, generator=generator)  # the same draws as inside vae_loss
    with torch.no_grad():
        means = vae.encode(pixels).latent_dist.mean
        expected = patch_locality_loss(means, vae.encode(mixed).latent_dist.mean, source, cut).item()
    assert parts["locality"] == pytest.approx(expected, rel=1e-4)
    base = weighted.item() - 2.0 * parts["locality"]
    assert base == pytest.approx(parts["l1"] + parts["mse"] + 1e-5 * parts["kl"], rel=1e-5)
    weighted.backward()  # the term trains the encoder
    assert vae.encoder.conv_in.weight.grad is not None


# ------------------------------------------------------------------------------------------------------------------
# examples/shapes/train.py (the recipe that makes the shipped model)
# ------------------------------------------------------------------------------------------------------------------
def test_train_script_takes_a_given_autoencoder(tmp_path):
    """`train.py --vae SOURCE` puts SOURCE's autoencoder where the training step would (the shipped model's for
    `default`, the same weights from its pipeline, model or autoencoder folder), refuses to replace a different one,
    and refuses bad sources and `--vae-steps` with it before writing anything."""
    pytest.importorskip("diffusers")
    from harmon_hf.modeling_harmon import HarmonForConditionalGeneration
    from harmon_hf.shapes.vae import build_vae

    script = load_example("shapes/train.py")
    shipped = HarmonForConditionalGeneration.from_pretrained(script.DEFAULT_MODEL_DIR / "model").model.vae.state_dict()
    out = tmp_path / "run"
    folder = script.take_autoencoder(out, script.load_autoencoder("default"), "default")
    assert folder == out / "vae" / "vae"
    for source in (str(script.DEFAULT_MODEL_DIR), str(script.DEFAULT_MODEL_DIR / "model"), str(folder)):
        weights = script.load_autoencoder(source).state_dict()
        assert weights.keys() == shipped.keys() and all(torch.equal(weights[k], shipped[k]) for k in shipped)
    assert script.take_autoencoder(out, script.load_autoencoder(str(folder)), str(folder)) == folder  # same: kept
    before = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    other = build_vae((8, 8, 16, 16, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="holds another autoencoder than --vae 'other'"):
        script.take_autoencoder(out, other, "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit):  # the script refuses it too, and leaves OUT/vae as it was
        script.main(["--out", str(out), "--smoke", "--vae", str(tmp_path / "other")])
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not (out / "stage0").exists()

    with pytest.raises(ValueError, match="no config.json"):
        script.load_autoencoder(str(tmp_path / "missing"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="neither a diffusers AutoencoderKL nor a Harmon model"):
        script.load_autoencoder(str(tmp_path / "odd"))
    for argv in (["--vae", str(tmp_path / "missing")], ["--vae", "default", "--vae-steps", "5"]):
        with pytest.raises(SystemExit):
            script.main(["--out", str(tmp_path / "bad"), "--smoke", *argv])
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_train_script_caption_curriculum_picks_the_ordered_data(tmp_path):
    training_data = pytest.importorskip("harmon_hf.training.data")
    script = load_example("shapes/train.py")
    write_dataset(tmp_path / "train", 12, "train", seed=2)
    for name, _, _, stage_captions in script.STAGES:
        assert script.stage_data(tmp_path, stage_captions, "all") == tmp_path / "train"
        folder = script.stage_data(tmp_path, stage_captions, "curriculum")
        assert folder == (tmp_path / "train" / "ordered" if name != "stage3" else tmp_path / "train")
        (source,) = training_data.load_source(folder / "data_info.json")
        key = "caption_ordered" if folder.name == "ordered" else "caption"
        records = json.loads((tmp_path / "train" / "captions.json").read_text())
        assert [source.record(i).text for i in range(len(source))] == [r[key] for r in records]
    with pytest.raises(ValueError, match="'sorted'"):
        script.stage_data(tmp_path, "ordered", "sorted")
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "bad"), "--captions", "sorted"])
    assert not (tmp_path / "bad").exists()


def test_train_script_restarts_only_the_position_tables():
    """model.yaml's `mar: position_init_std` redraws the MAR's three position tables at that spread from a generator
    of their own (the same seed gives the same tables) and leaves every other initial weight as it was."""
    from harmon_hf.configuration_harmon import HarmonConfig
    from harmon_hf.default_model import default_model_path
    from harmon_hf.modeling_harmon import HarmonForConditionalGeneration

    script = load_example("shapes/train.py")
    torch.manual_seed(0)
    model = HarmonForConditionalGeneration(HarmonConfig.from_pretrained(default_model_path() / "model"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    script.restart_position_tables(model, None, seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    script.restart_position_tables(model, 0.5, seed=3)
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {
        f"model.mar.{name}" for name in script.POSITION_TABLES
    }
    tables = {name: getattr(model.model.mar, name).detach().clone() for name in script.POSITION_TABLES}
    assert before["model.mar.encoder_pos_embed_learned"].std().item() < 0.03  # upstream's 0.02 before
    for table in tables.values():
        assert table.std().item() == pytest.approx(0.5, rel=0.05)
    script.restart_position_tables(model, 0.5, seed=3)
    assert all(torch.equal(table, getattr(model.model.mar, name)) for name, table in tables.items())
    for bad in (0.0, -0.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="position_init_std"):
            script.restart_position_tables(model, bad, seed=3)
    assert all(torch.equal(table, getattr(model.model.mar, name)) for name, table in tables.items())


def test_train_script_study_settings(tmp_path):
    """`--set`, `--steps-scale` and `--model-set` change the recipe for a study: YAML values into every stage's
    config and model.yaml's entries, max_steps scaled; bad ones are refused before anything is written, and a run
    continues in its folder only with the settings it started with."""
    script = load_example("shapes/train.py")
    assert script.parse_assignments(["use_cpu=false", "save_strategy='no'", "lr=1e-3"], "--set") == {
        "use_cpu": False,
        "save_strategy": "no",
        "lr": 1e-3,
    }
    for bad in (["use_cpu"], ["=1"], ["x=[1"]):
        with pytest.raises(ValueError, match="--set"):
            script.parse_assignments(bad, "--set")
    config = script.stage_config("stage2_full.yaml", "stage2.yaml", False, {"use_cpu": False}, 2.5)
    plain = script.stage_config("stage2_full.yaml", "stage2.yaml", False)
    assert config["max_steps"] == round(plain["max_steps"] * 2.5) and config["use_cpu"] is False
    assert plain["use_cpu"] is True
    model_yaml = script.load_yaml(script.CONFIGS / "model.yaml")
    changed = script.apply_model_settings(model_yaml, {"llm.num_hidden_layers": 6, "diffusion_head.snr_gamma": 5})
    assert changed["llm"]["num_hidden_layers"] == 6 and changed["diffusion_head"]["snr_gamma"] == 5
    assert model_yaml["llm"]["num_hidden_layers"] == 3  # the original is left alone
    assert changed["mar"]["position_init_std"] == 0.5  # a float entry takes an int too
    assert script.apply_model_settings(model_yaml, {"mar.position_init_std": 1})["mar"]["position_init_std"] == 1
    for bad, message in (
        ({"llm.depth": 6}, "no such entry"),
        ({"llm.num_hidden_layers.x": 6}, "no such entry"),
        ({"llm.num_hidden_layers": "six"}, "model.yaml's value there is 3"),
        ({"llm.num_hidden_layers": 6.5}, "model.yaml's value there is 3"),
    ):
        with pytest.raises(ValueError, match=message):
            script.apply_model_settings(model_yaml, bad)
    for argv in (
        ["--steps-scale", "0"],
        ["--steps-scale", "nan"],
        ["--set", "use_cpu"],
        ["--model-set", "llm.depth=6"],
        ["--model-set", "mar.position_init_std=-1"],
        ["--model-set", "vae.locality_weight=-1"],
        ["--model-set", "vae.attention=1"],
        ["--model-set", "diffusion_head.x0_readout_weight=-1"],
        ["--model-set", "diffusion_head.x0_readout_weight=abc"],
        ["--model-set", "diffusion_head.snr_gamma=0"],
        ["--model-set", "grad_scale_image2text=-1"],
        ["--model-set", "grad_scale_image2text=.nan"],
        ["--model-set", "kind_weights.pair=-0.5"],
        ["--model-set", "sampling.num_inference_steps=0"],
        ["--model-set", "sampling.guidance_scale=0.5"],
        ["--model-set", "sampling.temperature=-1"],
        [
            "--model-set",
            "kind_weights.single=0",
            "--model-set",
            "kind_weights.pair=0",
            "--model-set",
            "kind_weights.count=0",
        ],
    ):
        with pytest.raises(SystemExit):
            script.main(["--out", str(tmp_path / "bad"), "--smoke", *argv])
        assert not (tmp_path / "bad").exists()

    out = tmp_path / "run"
    out.mkdir()
    (out / "run_settings.json").write_text(json.dumps({"set": {}, "steps_scale": 2.0, "model_set": {}}))
    with pytest.raises(SystemExit):  # started with --steps-scale 2: a plain rerun is refused, nothing is added
        script.main(["--out", str(out), "--smoke"])
    assert sorted(p.name for p in out.iterdir()) == ["run_settings.json"]


def test_train_script_autoencoder_options():
    """model.yaml's `vae:` entries reach `VAETrainingConfig` (steps aside); unknown entries and bad values are
    refused with the entry named."""
    from harmon_hf.shapes.vae import VAETrainingConfig

    script = load_example("shapes/train.py")
    vae_yaml = script.load_yaml(script.CONFIGS / "model.yaml")["vae"]
    options = script.autoencoder_options(vae_yaml)
    assert "steps" not in options and set(options) <= set(VAETrainingConfig.__dataclass_fields__)
    assert options["attention"] is vae_yaml["attention"]
    assert options["locality_weight"] == vae_yaml["locality_weight"]
    assert script.autoencoder_options({"locality_weight": 2}) == {"locality_weight": 2}
    for bad, message in (
        ({"depth": 3}, "vae.depth: not an autoencoder setting"),
        ({"attention": "yes"}, "vae.attention: wrong kind"),
        ({"locality_weight": True}, "vae.locality_weight: wrong kind"),
        ({"locality_weight": -0.5}, "finite number >= 0, got -0.5"),
        ({"locality_weight": float("nan")}, "finite number >= 0, got nan"),
        ({"block_out_channels": 64}, "vae.block_out_channels: wrong kind"),
    ):
        with pytest.raises(ValueError, match=message):
            script.autoencoder_options(bad)


def test_train_script_smoke_builds_the_configured_model(tmp_path):
    """`train.py --smoke` runs every step (about 30 s): the VAE has model.yaml's widths, each stage trains its
    configured steps from the previous stage, and the pipeline folder loads, with the training world beside it."""
    pytest.importorskip("diffusers")
    import yaml

    script = load_example("shapes/train.py")
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "bad"), "--smoke", "--vae-steps", "0"])
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    out = tmp_path / "run"
    script.main(["--out", str(out), "--smoke", "--threads", "2"])
    model_yaml = yaml.safe_load((script.CONFIGS / "model.yaml").read_text())
    vae_config = json.loads((out / "vae" / "vae" / "config.json").read_text())
    assert vae_config["block_out_channels"] == model_yaml["vae"]["block_out_channels"]
    assert vae_config["mid_block_add_attention"] == model_yaml["vae"]["attention"]
    vae_report = json.loads((out / "vae" / "vae_report.json").read_text())
    assert vae_report["config"]["locality_weight"] == model_yaml["vae"]["locality_weight"]
    report = json.loads((out / "train_report.json").read_text())
    assert set(report["seconds"]) == {"data", "vae", "stage0", "stages", "pipeline"}
    for name, *_ in script.STAGES:
        merged = yaml.safe_load((out / f"{name}.yaml").read_text())
        assert merged["max_steps"] == script.SMOKE_OVERRIDES["max_steps"]
        state = json.loads((out / name / "trainer_state.json").read_text())
        assert state["global_step"] == script.SMOKE_OVERRIDES["max_steps"]
    assert load_world(out / "harmon-shapes").layout == model_yaml["layout"]
    assert load_world(out / "harmon-shapes").kind_weights == model_yaml["kind_weights"]
    model_config = json.loads((out / "harmon-shapes" / "model" / "config.json").read_text())
    assert model_config["grad_scale_image2text"] == model_yaml["grad_scale_image2text"]

    from harmon_hf.pipeline_harmon import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(out / "harmon-shapes")
    assert list(pipe.model.model.vae.config.block_out_channels) == model_yaml["vae"]["block_out_channels"]
    assert pipe.scheduler.config.clip_sample is True
    assert pipe.sampling_defaults == model_yaml["sampling"]  # model.yaml's sampling defaults are the folder's


def test_train_script_data_follows_the_kind_weights(tmp_path):
    """model.yaml's `kind_weights` decide the mix of the training pictures; a folder written with another mix is
    refused rather than mixed into."""
    script = load_example("shapes/train.py")
    data, world = script.make_data(tmp_path, 12, 3, layout="slots", kind_weights={"pair": 1.0})
    assert world.kind_weights == {"pair": 1.0}
    records = json.loads((data / "train" / "captions.json").read_text())
    assert [r["kind"] for r in records] == ["pair"] * 12
    with pytest.raises(ValueError, match="kind weights"):
        script.make_data(tmp_path, 12, 3, layout="slots")
