"""LoRA fine-tuning (harmon_hf.lora, HarmonPipeline's LoRA methods, examples/train.py --lora) on the converted
upstream-tiny model: presets adapt exactly the intended modules, training changes outputs, merge / save / reload
reproduce them, the adapter file is small, errors are clear, and the pipeline generates with adapters."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from fixture_utils import FIXTURE_DIR, requires_fixture
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from harmon_hf import HarmonForConditionalGeneration, HarmonPipeline, HarmonProcessor
from harmon_hf.lora import (
    LORA_PRESETS,
    check_lora_presets_for_tasks,
    get_harmon_peft_model,
    harmon_lora_config,
    lora_preset_names,
    lora_target_names,
)
from harmon_hf.training import IMAGE_TO_TEXT, TEXT_TO_IMAGE, HarmonDataCollator, build_task_dataset

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

pytestmark = requires_fixture

COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 210, 30)}
SAMPLE = dict(num_inference_steps=2, num_diffusion_steps=5, guidance_scale=2.0, output_type="np")


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two threads spend most of their
    time waiting for each other (20x slower training steps measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """The upstream-tiny checkpoint converted to a pipeline folder (what `harmon-hf convert` writes)."""
    from harmon_hf.convert import convert

    out = tmp_path_factory.mktemp("lora") / "harmon-tiny"
    return convert(FIXTURE_DIR / "harmon.pth", FIXTURE_DIR / "kl16.ckpt", FIXTURE_DIR / "llm", out, verbose=False)


@pytest.fixture(scope="module")
def base_model(pipeline_dir) -> HarmonForConditionalGeneration:
    return HarmonForConditionalGeneration.from_pretrained(pipeline_dir / "model").eval()


@pytest.fixture(scope="module")
def processor(pipeline_dir) -> HarmonProcessor:
    return HarmonProcessor.from_pretrained(pipeline_dir / "processor")


def make_caption_folder(root: Path) -> Path:
    """An image folder with metadata.jsonl: one coloured box per colour."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (name, rgb) in enumerate(COLORS.items()):
            array = np.full((64, 72, 3), 245, np.uint8)
            array[16:48, 14 + i : 58] = rgb
            PIL.Image.fromarray(array).save(root / f"{name}.png")
            f.write(json.dumps({"file_name": f"{name}.png", "text": f"a {name} box on a white background"}) + "\n")
    return root


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return make_caption_folder(tmp_path_factory.mktemp("lora") / "boxes")


@pytest.fixture(scope="module")
def batch(data_folder, processor) -> dict[str, torch.Tensor]:
    """One batch holding both tasks (understanding and generation inputs, 2 examples each)."""
    ip = processor.image_processor
    collator = HarmonDataCollator(processor, unconditional_prob=0.0)
    merged: dict[str, torch.Tensor] = {}
    for task in (IMAGE_TO_TEXT, TEXT_TO_IMAGE):
        ds = build_task_dataset([data_folder], task, ip, resolution=64, t2i_crop="center")
        part = collator([ds[i] for i in range(2)])
        part.pop("num_skipped_images")
        merged.update(part)
    return merged


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deterministic outputs of both tasks: understanding logits, the MAR decoder's conditions and the t2i loss."""
    with torch.no_grad():
        out = model(**batch, generator=torch.Generator().manual_seed(0))
        parts = model.text_to_image_loss(
            input_ids=batch["generation_input_ids"],
            attention_mask=batch["generation_attention_mask"],
            pixel_values=batch["generation_pixel_values"],
            generator=torch.Generator().manual_seed(1),
        )
    return {"logits": out.logits, "loss_t2i": out.loss_t2i, "z": parts["z"], "loss": parts["loss"]}


def assert_outputs_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def lora_modules(model: nn.Module) -> set[str]:
    """Names of the modules that hold LoRA layers, relative to the Harmon model."""
    names = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    return {name.removeprefix("base_model.model.") for name in names}


def expected_modules(model: HarmonForConditionalGeneration, preset: str) -> set[str]:
    """The modules a preset should adapt, from the module tree (independently of the preset's regex)."""

    def linears(prefix: str, module: nn.Module) -> set[str]:
        return {f"{prefix}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)}

    inner = model.model
    groups = {
        "llm_attention": {
            f"model.language_model.layers.{i}.self_attn.{p}_proj"
            for i in range(len(inner.language_model.layers))
            for p in "qkvo"
        },
        "mar_encoder": linears("model.mar.encoder_blocks", inner.mar.encoder_blocks),
        "mar_decoder": linears("model.mar.decoder_blocks", inner.mar.decoder_blocks),
        "diffusion_head": linears("model.diffusion_head", inner.diffusion_head),
        "projectors": linears("model.proj_in", inner.proj_in) | linears("model.proj_out", inner.proj_out),
    }
    groups["llm"] = groups["llm_attention"] | {
        f"model.language_model.layers.{i}.mlp.{p}_proj"
        for i in range(len(inner.language_model.layers))
        for p in ("gate", "up", "down")
    }
    groups["mar"] = groups["mar_encoder"] | groups["mar_decoder"]
    groups["all"] = groups["llm"] | groups["mar"] | groups["diffusion_head"] | groups["projectors"]
    return groups[preset]


def train_steps(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 4, lr: float = 1e-2) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = model(**batch, generator=torch.Generator().manual_seed(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(base_model, batch, tmp_path_factory) -> dict:
    """A LoRA adapter on every preset, trained a few steps and saved; with the base and adapted outputs."""
    model = copy.deepcopy(base_model)
    peft_model = get_harmon_peft_model(model, "all", r=4, alpha=8)
    train_steps(peft_model, batch)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(folder)
    return {
        "peft_model": peft_model,
        "dir": folder,
        "base": outputs(base_model, batch),
        "adapted": outputs(peft_model, batch),
    }


# ------------------------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", lora_preset_names())
def test_preset_adapts_exactly_its_modules(base_model, batch, preset):
    """Each preset puts LoRA layers on exactly its modules (never the VAE), and only their LoRA weights get
    gradients from a step of both tasks."""
    model = copy.deepcopy(base_model)
    expected = expected_modules(model, preset)
    assert set(lora_target_names(model, harmon_lora_config(preset))) == expected
    peft_model = get_harmon_peft_model(model, preset, r=2)
    assert lora_modules(peft_model) == expected
    assert not any(".vae." in f".{name}" for name in lora_modules(peft_model))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    peft_model.train()
    peft_model(**batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == trainable  # both tasks together reach every adapted module
    adapted = {n.removeprefix("base_model.model.").split(".lora_")[0] for n in with_grad}
    assert adapted == expected


def test_presets_are_anchored_regexes():
    config = harmon_lora_config(["mar_decoder", "diffusion_head"], r=8, dropout=0.1)
    assert isinstance(config.target_modules, str) and config.lora_alpha == 16 and config.lora_dropout == 0.1
    assert config.task_type is None
    # the same presets, given as a comma-separated string (as a YAML string or one CLI word may give them)
    assert harmon_lora_config("mar_decoder,diffusion_head").target_modules == config.target_modules
    assert harmon_lora_config("mar").target_modules == harmon_lora_config(["mar_encoder", "mar_decoder"]).target_modules
    assert set(LORA_PRESETS) <= set(lora_preset_names())


def test_wrong_preset_and_unmatched_targets_are_clear_errors(base_model):
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="Unknown LoRA preset.*'mar_decodr'.*valid presets: llm, llm_attention"):
        get_harmon_peft_model(model, ["mar_decodr"])
    with pytest.raises(ValueError, match="valid presets"):
        harmon_lora_config([])
    with pytest.raises(ValueError, match=r"match no module.*presets: llm, .*diffusion_head"):
        get_harmon_peft_model(model, LoraConfig(target_modules=r"model\.nothing\.\d+"))
    # a preset this model does not have (a MAR on its own has no LLM)
    with pytest.raises(ValueError, match="preset 'llm' matches no module of this HarmonMAR.*valid presets"):
        get_harmon_peft_model(copy.deepcopy(base_model.model.mar), "llm")
    # a suffix list also hits the VAE's attention: refused
    with pytest.raises(ValueError, match="would adapt the VAE"):
        get_harmon_peft_model(model, LoraConfig(target_modules=["to_q", "q_proj"]))
    assert not lora_modules(model)  # nothing was injected by the failed calls
    # generation-only adapters cannot train on understanding data (its loss would have no gradient)
    with pytest.raises(ValueError, match="nothing that the image-to-text .* reaches; add one of llm"):
        check_lora_presets_for_tasks(["mar_decoder", "diffusion_head"], [IMAGE_TO_TEXT, TEXT_TO_IMAGE])
    check_lora_presets_for_tasks(["mar_decoder", "diffusion_head"], [TEXT_TO_IMAGE])
    check_lora_presets_for_tasks("mar", [IMAGE_TO_TEXT])


# ------------------------------------------------------------------------------------------------------------------
# training, merging, saving
# ------------------------------------------------------------------------------------------------------------------
def test_trained_adapter_changes_outputs(trained, batch):
    base, adapted = trained["base"], trained["adapted"]
    for key in base:
        assert (base[key] - adapted[key]).abs().max() > 1e-3, key
    # the base weights themselves did not move: without the adapter the outputs are the base model's
    with trained["peft_model"].disable_adapter():
        assert_outputs_close(outputs(trained["peft_model"], batch), trained["base"], atol=1e-6)


def test_saved_adapter_is_small_and_reloads(trained, base_model, batch, pipeline_dir):
    folder = trained["dir"]
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapter_size = (folder / "adapter_model.safetensors").stat().st_size
    base_size = (pipeline_dir / "model" / "model.safetensors").stat().st_size
    assert adapter_size < 0.05 * base_size, (adapter_size, base_size)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base_model), folder)
    assert_outputs_close(outputs(reloaded, batch), trained["adapted"], atol=1e-6)


def test_merged_equals_unmerged(trained, base_model, batch):
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), trained["dir"])
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, HarmonForConditionalGeneration) and not lora_modules(merged)
    assert set(merged.state_dict()) == set(base_model.state_dict())  # a plain Harmon model again
    assert_outputs_close(outputs(merged, batch), trained["adapted"], atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# pipeline
# ------------------------------------------------------------------------------------------------------------------
def generate(pipe: HarmonPipeline) -> np.ndarray:
    return pipe("a red box", generator=torch.Generator().manual_seed(0), **SAMPLE).images


def test_pipeline_load_fuse_unload(trained, pipeline_dir, base_model):
    pipe = HarmonPipeline.from_pretrained(pipeline_dir)
    model = pipe.model
    base_image = generate(pipe)
    pipe.load_lora_weights(trained["dir"])
    assert pipe.model is model and lora_modules(model) == expected_modules(base_model, "all")
    adapted = generate(pipe)
    assert adapted.shape == (1, 64, 64, 3) and np.abs(adapted - base_image).max() > 1e-3
    pipe.fuse_lora()
    np.testing.assert_allclose(generate(pipe), adapted, atol=1e-4)
    pipe.unfuse_lora()
    np.testing.assert_allclose(generate(pipe), adapted, atol=1e-4)
    pipe.unload_lora_weights()  # unfused: the base model comes back
    assert pipe.peft_model is None and not lora_modules(pipe.model)
    np.testing.assert_allclose(generate(pipe), base_image, atol=1e-5)
    # fuse + unload: a plain model with the adapter baked in (what one would save)
    pipe.load_lora_weights(trained["dir"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not lora_modules(pipe.model) and not hasattr(pipe.model, "peft_config")
    np.testing.assert_allclose(generate(pipe), adapted, atol=1e-4)
    with pytest.raises(ValueError, match="no LoRA adapter is loaded"):
        pipe.fuse_lora()


def test_pipeline_with_adapted_and_merged_models(trained, base_model, processor, pipeline_dir):
    from harmon_hf.scheduling_harmon import HarmonDDPMScheduler

    reference = HarmonPipeline.from_pretrained(pipeline_dir)
    reference.load_lora_weights(trained["dir"])
    expected = generate(reference)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), trained["dir"])
    # the LoRA layers live inside the base model, so the pipeline takes `get_base_model()`
    adapted = HarmonPipeline(model=peft_model.get_base_model(), scheduler=HarmonDDPMScheduler(), processor=processor)
    np.testing.assert_allclose(generate(adapted), expected, atol=1e-5)
    merged = HarmonPipeline(model=peft_model.merge_and_unload(), scheduler=HarmonDDPMScheduler(), processor=processor)
    np.testing.assert_allclose(generate(merged), expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# examples/train.py --lora
# ------------------------------------------------------------------------------------------------------------------
def test_train_script_with_lora_saves_only_the_adapter(tmp_path, pipeline_dir, data_folder, base_model):
    import train

    out = tmp_path / "out"
    args = [str(EXAMPLES / "configs" / "tiny_cpu.yaml"), "--model_name_or_path", str(pipeline_dir)]
    args += ["--i2t_data", str(data_folder), "--t2i_data", str(data_folder), "--output_dir", str(out)]
    args += ["--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    args += ["--lora", "llm_attention", "mar_decoder", "diffusion_head", "--lora_r", "4", "--lora_alpha", "8"]
    trainer = train.main(args)
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].r == 4 and trainer.model.peft_config["default"].lora_alpha == 8
    for folder in (out, out / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
        assert not (folder / "model.safetensors").exists(), folder
    assert (out / "processor_config.json").is_file()
    # the base weights did not move; the adapter did
    trained_state = trainer.model.get_base_model().state_dict()
    for name, value in base_model.state_dict().items():
        key = (
            name
            if name in trained_state
            else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(trained_state[key], value), name
    lora_b = [p for n, p in trainer.model.named_parameters() if ".lora_B." in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)
    # the output folder loads into the pipeline
    pipe = HarmonPipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(out)
    expected = {m for p in ("llm_attention", "mar_decoder", "diffusion_head") for m in expected_modules(base_model, p)}
    assert lora_modules(pipe.model) == expected
    assert generate(pipe).shape == (1, 64, 64, 3)


def test_finetune_lora_example(tmp_path, pipeline_dir, data_folder):
    import finetune_lora

    out = tmp_path / "my-lora"
    args = ["--model", str(pipeline_dir), "--data", str(data_folder), "--output_dir", str(out), "--task", "both"]
    args += ["--steps", "2", "--batch_size", "2", "--r", "4", "--cpu", "--merge"]
    args += ["--sample_prompt", "a red box", "--sample_steps", "2"]
    assert finetune_lora.main(args) == out
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert PIL.Image.open(out / "samples" / "00.png").size == (64, 64)
    # the merged folder is a plain model (+ processor) that loads as a pipeline
    merged = HarmonPipeline.from_pretrained(out / "merged")
    reference = HarmonPipeline.from_pretrained(pipeline_dir)
    reference.load_lora_weights(out)
    np.testing.assert_allclose(generate(merged), generate(reference), atol=1e-4)
