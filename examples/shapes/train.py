#!/usr/bin/env python
"""Reproduce Harmon-Shapes, the embedded default model, from scratch on CPU (issue #7).

    python examples/shapes/train.py --out out/harmon-shapes                 # the shipped weights, 32-83 min on 2 cores
    python examples/shapes/train.py --out out/harmon-shapes --ship          # ... and install it as the default model
    python examples/shapes/train.py --out out/hs-repro --vae default        # the shipped autoencoder, then the stages
    python examples/shapes/train.py --out /tmp/hs-smoke --smoke             # every step in under a minute
    python examples/shapes/train.py --out out/hs-curr --captions curriculum # stages I-II on ordered pair captions
    python examples/shapes/train.py --out out/hs-gpu --vae default --set use_cpu=false --steps-scale 4 --eval 50
                                                                            # a study: 4x the steps on a GPU

The steps (each skipped when its output already exists in OUT, so an interrupted run continues):

1. `OUT/data`: the Harmon-Shapes train/test splits and the ~500-token tokenizer (`harmon_hf.shapes.data`,
   `harmon_hf.shapes.tokenizer`; seconds).
2. `OUT/vae`: the kl16-layout autoencoder of `model.yaml`'s `vae:` section (`harmon_hf.shapes.vae.train_vae`;
   7-8 minutes on AVX-512, about 14 on AVX2), or with `--vae SOURCE` the autoencoder of SOURCE (`default`: the
   shipped model's).
3. `OUT/stage0`: a randomly initialised Harmon of the architecture in `examples/shapes/configs/model.yaml`
   (a small Qwen2 LLM from scratch, a small MAR and diffusion head; the MAR's position tables drawn at model.yaml's
   `position_init_std`) with the trained VAE inside, and its processor.
4. `OUT/stage1`, `OUT/stage2`, `OUT/stage3`: the three Harmon training stages, each run by `examples/train.py`
   (the project's Trainer script) with the upstream stage preset (`examples/configs/stage*.yaml`) updated by the
   shapes overrides (`examples/shapes/configs/stage*.yaml`); the merged file is saved as `OUT/stageN.yaml`.
   Stage 1 aligns with the LLM frozen, stage 2 trains everything, stage 3 anneals everything at a lower rate.
   With `--captions curriculum`, stages 1 and 2 read `OUT/data/train/ordered` (the same pictures, every pair caption
   naming its left / top object first) and stage 3 both phrasings; the default trains on both throughout.
5. `OUT/harmon-shapes`: the `HarmonPipeline` folder (model/, scheduler/, processor/, model_index.json), what
   `harmon_hf.default_model` ships; `--ship` copies it into `src/harmon_hf/default_model/harmon-shapes`.
6. With `--eval N`: ShapesEval on N held-out scenes per kind (`OUT/shapes_eval.json`; on the GPU when there is one).

Studies change the recipe without editing it: `--set KEY=VALUE` sets a Trainer entry of every stage (a YAML value,
after the shapes overrides; `use_cpu=false` trains on a GPU), `--steps-scale F` multiplies every stage's `max_steps`
(the cosine schedules stretch with them) and `--model-set KEY.PATH=VALUE` an entry of model.yaml
(`llm.num_hidden_layers=6`). They are checked before anything is written and kept in `OUT/run_settings.json`; a run
continues in OUT only with the settings it started with. Without them the script makes the shipped weights.

`OUT/train_report.json` records the wall time of every step, the parameter counts and the weight size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = REPO / "examples" / "configs"
DEFAULT_MODEL_DIR = REPO / "src" / "harmon_hf" / "default_model" / "harmon-shapes"

# (name, upstream preset, shapes overrides, captions under --captions curriculum). The captions of text-to-image and
# captioning: "ordered" (every pair phrased with its left / top object first, `PromptSpec.ordered`) or "all" (both
# phrasings, as written). With both phrasings a pair's sides depend on the word order and the relation word together
# (an XOR), which a model trained from scratch does not pick up in this budget (examples/shapes/order_probe.py).
STAGES: tuple[tuple[str, str, str, str], ...] = (
    ("stage1", "stage1_alignment.yaml", "stage1.yaml", "ordered"),
    ("stage2", "stage2_full.yaml", "stage2.yaml", "ordered"),
    ("stage3", "stage3_high_quality.yaml", "stage3.yaml", "all"),
)
CAPTIONS = ("all", "curriculum")  # --captions: both phrasings in every stage (the shipped recipe), or STAGES' column

# --smoke: the same steps, a few optimizer steps each (checks the script, not the model).
SMOKE_OVERRIDES: dict[str, Any] = {"max_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 4}


def log(message: str) -> None:
    """Timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping (empty file -> {})."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


# ------------------------------------------------------------------------------------------------------------------
# 1-2: data and autoencoder
# ------------------------------------------------------------------------------------------------------------------
def make_data(
    out: Path,
    train: int,
    test: int,
    seed: int = 0,
    layout: str = "random",
    kind_weights: dict[str, float] | None = None,
) -> tuple[Path, Any]:
    """Write OUT/data/{train,test,tokenizer} unless present (`layout`, `kind_weights`: see `ShapesWorld`; None: the
    world's default mix); returns the data folder and its `ShapesWorld`."""
    from harmon_hf.shapes.data import ShapesWorld, write_dataset, write_ordered_captions
    from harmon_hf.shapes.tokenizer import save_tokenizer

    data = out / "data"
    world = ShapesWorld(resolution=64, layout=layout, **({"kind_weights": dict(kind_weights)} if kind_weights else {}))
    for split, n in (("train", train), ("test", test)):
        written = data / split / "world.json"
        if written.is_file():
            # an interrupted run continues only in the world it started in
            if ShapesWorld.from_dict(json.loads(written.read_text(encoding="utf-8"))["world"]) != world:
                raise ValueError(
                    f"{written} holds another world than this run's (layout {layout!r}, kind weights "
                    f"{world.kind_weights}); use a new --out"
                )
            if not (data / split / "ordered" / "data_info.json").is_file():  # written before ordered captions
                write_ordered_captions(data / split)
        else:
            summary = write_dataset(data / split, n, split=split, seed=seed, world=world)
            log(f"data: {split} {summary['num_images']} pictures, {summary['num_questions']} questions")
    if not (data / "tokenizer" / "tokenizer.json").is_file():
        save_tokenizer(data / "tokenizer", 500, world)
    return data, world


# model.yaml `vae:` entries that train.py passes to `VAETrainingConfig` (`steps` is read separately: --vae-steps).
VAE_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "block_out_channels": list,
    "attention": bool,
    "locality_weight": (int, float),
}


def autoencoder_options(vae_yaml: dict[str, Any]) -> dict[str, Any]:
    """The `VAETrainingConfig` settings of model.yaml's `vae:` section; an unknown entry or a value of the wrong
    kind raises ValueError naming it."""
    options = {}
    for key, value in vae_yaml.items():
        if key == "steps":
            continue
        if key not in VAE_OPTIONS:
            raise ValueError(
                f"model.yaml vae.{key}: not an autoencoder setting (known: steps, {', '.join(VAE_OPTIONS)})"
            )
        if isinstance(value, bool) != (VAE_OPTIONS[key] is bool) or not isinstance(value, VAE_OPTIONS[key]):
            raise ValueError(f"model.yaml vae.{key}: wrong kind of value {value!r}")
        if key == "locality_weight" and not (0 <= value < float("inf")):
            raise ValueError(f"model.yaml vae.locality_weight must be a finite number >= 0, got {value!r}")
        options[key] = value
    return options


def train_autoencoder(out: Path, steps: int, smoke: bool, options: dict[str, Any] | None = None) -> Path:
    """Train the shapes VAE into OUT/vae unless present; returns the diffusers folder OUT/vae/vae.

    `options`: `VAETrainingConfig` fields from model.yaml's `vae:` section (`block_out_channels`, `attention`,
    `locality_weight`, ...; see `autoencoder_options`). A fixed number of steps and no time limit, so that the
    result does not depend on the machine's speed."""
    from harmon_hf.shapes.vae import VAETrainingConfig, train_vae

    folder = out / "vae"
    if not (folder / "vae" / "config.json").is_file():
        settings: dict[str, Any] = {**(options or {}), "steps": steps, "time_limit_minutes": None}
        if "block_out_channels" in settings:
            settings["block_out_channels"] = tuple(settings["block_out_channels"])
        if smoke:
            settings.update(steps=20, eval_images=16, log_every=5)
        train_vae(VAETrainingConfig(**settings), folder, log=log)
    return folder / "vae"


def load_autoencoder(source: str) -> Any:
    """The `AutoencoderKL` of `source`: "default" (the shipped model's), a diffusers autoencoder folder, a Harmon
    model folder or a Harmon pipeline folder (its model/). Raises ValueError naming `source` for anything else."""
    from diffusers import AutoencoderKL

    from harmon_hf.modeling_harmon import HarmonForConditionalGeneration

    folder = DEFAULT_MODEL_DIR if source == "default" else Path(source)
    if (folder / "model_index.json").is_file():
        folder = folder / "model"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--vae {source!r}: no config.json in {folder} (an autoencoder, model or pipeline folder)")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") == "AutoencoderKL":
        return AutoencoderKL.from_pretrained(folder)
    if config.get("model_type") == "harmon":
        return HarmonForConditionalGeneration.from_pretrained(folder).model.vae
    raise ValueError(f"--vae {source!r}: {config_file} is neither a diffusers AutoencoderKL nor a Harmon model")


def take_autoencoder(out: Path, vae: Any, source: str) -> Path:
    """Step 2 with a given autoencoder (`--vae`): save `vae` as OUT/vae/vae, the folder the training step would
    write; returns it. A different autoencoder already there is refused (ValueError), not replaced."""
    from diffusers import AutoencoderKL

    folder = out / "vae" / "vae"
    if (folder / "config.json").is_file():
        present = AutoencoderKL.from_pretrained(folder).state_dict()
        wanted = vae.state_dict()
        same = present.keys() == wanted.keys() and all(torch.equal(present[k], wanted[k]) for k in wanted)
        if not same:
            raise ValueError(f"{folder} holds another autoencoder than --vae {source!r}; remove it or drop --vae")
        return folder
    vae.save_pretrained(folder)
    (out / "vae" / "source.json").write_text(json.dumps({"vae": source}) + "\n")
    log(f"vae: taken from {source}")
    return folder


# ------------------------------------------------------------------------------------------------------------------
# 3: the initial model
# ------------------------------------------------------------------------------------------------------------------
def build_config(model_yaml: dict[str, Any], vae_config: dict[str, Any], tokenizer, image_token_id: int) -> Any:
    """`HarmonConfig` of Harmon-Shapes: the architecture of `model.yaml`, the trained VAE's layout and scale, and
    the vocabulary of the shapes tokenizer with `<image>` (`image_token_id`, the last id)."""
    from harmon_hf.configuration_harmon import HarmonConfig
    from harmon_hf.shapes.vae import HARMON_VAE_KEYS

    llm, mar, head = model_yaml["llm"], model_yaml["mar"], model_yaml["diffusion_head"]
    multiple = int(llm.get("vocab_multiple", 64))
    vocab = -(-(image_token_id + 1) // multiple) * multiple
    text = dict(
        model_type="qwen2",
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_key_value_heads"],
        vocab_size=vocab,
        max_position_embeddings=llm["max_position_embeddings"],
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": float(llm["rope_theta"]), "rope_type": "default"},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    grid = model_yaml["image_size"] // 16
    mar_config = dict(
        token_dim=vae_config["latent_channels"],
        grid_size=grid,
        buffer_size=model_yaml["buffer_size"],
        encoder_embed_dim=mar["embed_dim"],
        encoder_depth=mar["encoder_depth"],
        encoder_num_heads=mar["num_heads"],
        decoder_embed_dim=mar["embed_dim"],
        decoder_depth=mar["decoder_depth"],
        decoder_num_heads=mar["num_heads"],
        attention_dropout=mar.get("dropout", 0.0),
        projection_dropout=mar.get("dropout", 0.0),
    )
    head_config = dict(
        in_channels=vae_config["latent_channels"],
        model_channels=head["model_channels"],
        num_res_blocks=head["num_res_blocks"],
        cond_channels=mar["embed_dim"],
    )
    for name in HEAD_LOSS_OPTIONS:  # absent / null: upstream's loss (unweighted, no read-out term)
        if head.get(name) is not None:
            head_config[name] = float(head[name])
    vae = {k: vae_config[k] for k in HARMON_VAE_KEYS}
    extra = {}
    if model_yaml.get("grad_scale_image2text") is not None:  # absent / null: upstream's 0.1
        extra["grad_scale_image2text"] = float(model_yaml["grad_scale_image2text"])
    return HarmonConfig(
        text_config=text,
        mar_config=mar_config,
        diffusion_head_config=head_config,
        vae_config=vae,
        image_token_id=image_token_id,
        vae_scale=float(vae_config["scaling_factor"]),  # 1 / std of the posterior means (train_vae)
        image_size=model_yaml["image_size"],
        **extra,
    )


def build_initial_model(
    out: Path, data: Path, vae_dir: Path, seed: int, model_yaml: dict[str, Any] | None = None
) -> Path:
    """OUT/stage0: random Harmon-Shapes weights of `model_yaml` (None: model.yaml) + the trained VAE, and the
    processor (a folder `examples/train.py` loads with `--model_name_or_path`)."""
    from diffusers import AutoencoderKL

    from harmon_hf.modeling_harmon import HarmonForConditionalGeneration
    from harmon_hf.processing_harmon import HarmonProcessor

    folder = out / "stage0"
    if (folder / "config.json").is_file():
        return folder
    model_yaml = load_yaml(CONFIGS / "model.yaml") if model_yaml is None else model_yaml
    processor = HarmonProcessor.from_llm_dir(
        data / "tokenizer", image_size=model_yaml["image_size"], buffer_size=model_yaml["buffer_size"]
    )
    vae = AutoencoderKL.from_pretrained(vae_dir)
    config = build_config(model_yaml, dict(vae.config), processor.tokenizer, processor.image_token_id)
    torch.manual_seed(seed)
    model = HarmonForConditionalGeneration(config)
    restart_position_tables(model, model_yaml["mar"].get("position_init_std"), seed)
    model.model.vae.load_state_dict(vae.state_dict())
    # Understanding answers end at <|im_end|>; pad with <|endoftext|> as Qwen2.5 does.
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    counts = {name: sum(p.numel() for p in getattr(model.model, name).parameters()) for name in _PARTS}
    (folder / "parameters.json").write_text(json.dumps(counts, indent=1) + "\n")
    log(f"stage0: {sum(counts.values()) / 1e6:.2f} M parameters {counts}")
    return folder


_PARTS = ("language_model", "mar", "diffusion_head", "proj_in", "proj_out", "vae")
POSITION_TABLES = ("encoder_pos_embed_learned", "decoder_pos_embed_learned", "diffusion_pos_embed_learned")


def check_position_init_std(std: Any) -> None:
    """Refuse a `mar.position_init_std` that is neither None nor a positive finite number (ValueError naming it)."""
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < float("inf")):
        raise ValueError(f"mar.position_init_std must be a positive number or absent, got {std!r}")


def check_data_and_loss_options(model_yaml: dict[str, Any]) -> None:
    """Refuse a `kind_weights` that `ShapesWorld` would refuse, a `grad_scale_image2text` that is neither None nor a
    finite number >= 0, and bad `sampling` defaults, before anything is written (ValueError naming the entry)."""
    from harmon_hf.shapes.data import ShapesWorld

    weights = model_yaml.get("kind_weights")
    if weights is not None:
        if not isinstance(weights, dict):
            raise ValueError(f"kind_weights must map scene kinds to weights, got {weights!r}")
        ShapesWorld(kind_weights=dict(weights))
    scale = model_yaml.get("grad_scale_image2text")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf")
    ):
        raise ValueError(f"grad_scale_image2text must be a finite number >= 0 or absent, got {scale!r}")
    check_sampling_options(model_yaml.get("sampling"))


def check_sampling_options(sampling: Any) -> None:
    """Refuse a model.yaml `sampling:` section that `HarmonPipeline` would refuse (unknown keys, bad values), before
    anything is trained (ValueError naming the entry)."""
    from harmon_hf.pipeline_harmon import UPSTREAM_SAMPLING, check_sampling_defaults

    if sampling is None:
        return
    if not isinstance(sampling, dict):
        raise ValueError(f"sampling must map {sorted(UPSTREAM_SAMPLING)} to values, got {sampling!r}")
    unknown = sorted(set(sampling) - set(UPSTREAM_SAMPLING))
    if unknown:
        raise ValueError(f"sampling: unknown entries {unknown}; known: {sorted(UPSTREAM_SAMPLING)}")
    check_sampling_defaults(
        sampling.get("num_inference_steps"), sampling.get("guidance_scale"), sampling.get("temperature")
    )


# model.yaml's `diffusion_head:` entries that shape the training loss (HarmonDiffusionHeadConfig fields, null = upstream)
HEAD_LOSS_OPTIONS = ("snr_gamma", "x0_readout_weight")


def check_head_options(head: dict[str, Any]) -> None:
    """Refuse model.yaml's training-loss options of the diffusion head (`snr_gamma`, `x0_readout_weight`) that its
    config would refuse, before anything is written (ValueError naming the entry)."""
    from harmon_hf.configuration_harmon import HarmonDiffusionHeadConfig

    for name in HEAD_LOSS_OPTIONS:
        try:
            HarmonDiffusionHeadConfig(**{name: head.get(name)})
        except (TypeError, ValueError) as error:
            raise ValueError(f"diffusion_head.{name}: {error}") from None


def restart_position_tables(model: Any, std: float | None, seed: int) -> None:
    """Draw the MAR's three learned position tables from N(0, `std`) (None: keep upstream's N(0, 0.02)).

    Upstream's tables start 25 times smaller than the token embeddings they are added to, which a MAR trained from
    scratch takes long to grow (model.yaml's `position_init_std` comment has the measurements). Drawn from a
    generator of their own, so every other initial weight stays as it was."""
    if std is None:
        return
    check_position_init_std(std)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in POSITION_TABLES:
            table = getattr(model.model.mar, name)
            table.copy_(torch.randn(table.shape, generator=generator) * std)


# ------------------------------------------------------------------------------------------------------------------
# 4: the training stages
# ------------------------------------------------------------------------------------------------------------------
def _train_main():
    """`main` of examples/train.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("harmon_train_script", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up here
    spec.loader.exec_module(module)
    return module.main


def stage_config(
    preset: str, overrides: str, smoke: bool, extra: dict[str, Any] | None = None, steps_scale: float = 1.0
) -> dict[str, Any]:
    """The upstream stage preset updated with the shapes overrides (and the smoke-test ones), then with `extra`
    (`--set`), its `max_steps` multiplied by `steps_scale` (rounded, at least 1)."""
    config = load_yaml(PRESETS / preset)
    config.update(load_yaml(CONFIGS / overrides))
    if smoke:
        config.update(SMOKE_OVERRIDES)
    config.update(extra or {})
    if steps_scale != 1.0:
        config["max_steps"] = max(1, round(int(config["max_steps"]) * steps_scale))
    return config


def parse_assignments(items: list[str], option: str) -> dict[str, Any]:
    """`["KEY=VALUE", ...]` -> `{KEY: yaml value}`; raises ValueError naming `option` and the bad item."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} takes KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{option} {item!r}: the value is not YAML ({error})") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        values[key.strip()] = value
    return values


def apply_model_settings(model_yaml: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A copy of `model_yaml` with each dotted `settings` key (`llm.num_hidden_layers`) replaced; a key that
    model.yaml does not have, or a value of another type than the one there, is refused (ValueError naming it)."""
    result = json.loads(json.dumps(model_yaml))
    for dotted, value in settings.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ValueError(f"--model-set {dotted!r}: model.yaml has no such entry")
        old = node[leaf]
        same_kind = isinstance(value, bool) == isinstance(old, bool) and (
            type(value) is type(old) or (isinstance(old, float) and isinstance(value, int))
        )
        if old is not None and not same_kind:
            raise ValueError(f"--model-set {dotted}={value!r}: model.yaml's value there is {old!r}")
        node[leaf] = value
    return result


def stage_data(data: Path, stage_captions: str, captions: str) -> Path:
    """The dataset folder a stage reads for text-to-image and captioning: `data/train`, or `data/train/ordered` for
    an "ordered" stage under `--captions curriculum`."""
    if captions not in CAPTIONS:
        raise ValueError(f"captions must be one of {CAPTIONS}, got {captions!r}")
    ordered = captions == "curriculum" and stage_captions == "ordered"
    return data / "train" / "ordered" if ordered else data / "train"


def run_stages(
    out: Path,
    data: Path,
    start: Path,
    smoke: bool,
    captions: str = "all",
    extra: dict[str, Any] | None = None,
    steps_scale: float = 1.0,
) -> Path:
    """Stages 1-3 in turn, each starting from the previous stage's output folder (`captions`: see `CAPTIONS`;
    `extra`, `steps_scale`: see `stage_config`)."""
    pictures_of = {name: stage_data(data, stage_captions, captions) for name, *_, stage_captions in STAGES}
    train_main = _train_main()
    previous = start
    for name, preset, overrides, _ in STAGES:
        folder = out / name
        if (folder / "config.json").is_file() and (folder / "processor_config.json").is_file():
            log(f"{name}: done before, kept")
            previous = folder
            continue
        config = stage_config(preset, overrides, smoke, extra, steps_scale)
        pictures = pictures_of[name]
        merged = out / f"{name}.yaml"
        merged.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            str(merged),
            "--model_name_or_path",
            str(previous),
            "--output_dir",
            str(folder),
            "--i2t_data",
            str(data / "train" / "conversations_multiturn.json"),
            str(pictures / "data_info.json"),
            "--t2i_data",
            str(pictures / "data_info.json"),
            "--latent_cache_dir",
            str(out / "latent_cache"),
        ]
        if list(folder.glob("checkpoint-*")):
            argv += ["--resume_from_checkpoint", "last"]  # an interrupted run continues where it stopped
        log(
            f"{name}: {preset} + shapes/configs/{overrides} ({config['max_steps']} steps, "
            f"{'ordered' if pictures.name == 'ordered' else 'all'} captions)"
        )
        start_time = time.perf_counter()
        train_main(argv)
        log(f"{name}: done in {(time.perf_counter() - start_time) / 60:.1f} min")
        previous = folder
    return previous


# ------------------------------------------------------------------------------------------------------------------
# 5-6: the pipeline folder, shipping, evaluation
# ------------------------------------------------------------------------------------------------------------------
def save_pipeline(
    stage_dir: Path, target: Path, world: dict[str, Any] | None = None, model_yaml: dict[str, Any] | None = None
) -> int:
    """Assemble `HarmonPipeline(model, HarmonDDPMScheduler(**model.yaml's scheduler), processor)` with model.yaml's
    sampling defaults from a stage folder and save it, with the training world (`world`, `ShapesWorld.to_dict()`)
    as `shapes_world.json` so that ShapesEval draws its test scenes in it; returns the size of the weights (bytes).
    `model_yaml`: None reads model.yaml."""
    from harmon_hf.modeling_harmon import HarmonForConditionalGeneration
    from harmon_hf.pipeline_harmon import HarmonPipeline
    from harmon_hf.processing_harmon import HarmonProcessor
    from harmon_hf.scheduling_harmon import HarmonDDPMScheduler
    from harmon_hf.shapes.run_eval import WORLD_FILE

    model = HarmonForConditionalGeneration.from_pretrained(stage_dir)
    processor = HarmonProcessor.from_pretrained(stage_dir)
    # Harmon's sampler with the x_0 clipping of model.yaml (see the comment there).
    model_yaml = load_yaml(CONFIGS / "model.yaml") if model_yaml is None else model_yaml
    scheduler = HarmonDDPMScheduler(**model_yaml.get("scheduler", {}))
    # e.g. {num_inference_steps: 1, ...} -> HarmonPipeline(default_num_inference_steps=1, ...): model_index.json
    sampling = {f"default_{key}": value for key, value in (model_yaml.get("sampling") or {}).items()}
    pipe = HarmonPipeline(model=model, scheduler=scheduler, processor=processor, **sampling)
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target, safe_serialization=True)
    if world is not None:
        (target / WORLD_FILE).write_text(json.dumps(world, indent=1) + "\n", encoding="utf-8")
    return sum(p.stat().st_size for p in target.rglob("*.safetensors"))


def ship(pipeline_dir: Path, target: Path = DEFAULT_MODEL_DIR) -> None:
    """Copy the pipeline folder into the package (replacing the embedded default model)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(pipeline_dir, target)
    log(f"shipped {pipeline_dir} -> {target}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run every step."""
    from harmon_hf.shapes.data import LAYOUTS
    from harmon_hf.shapes.vae import VAETrainingConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (data, vae, stages, the pipeline folder)")
    parser.add_argument("--train", type=int, default=20000, help="training pictures")
    parser.add_argument("--test", type=int, default=600, help="test pictures (written for inspection)")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--vae-steps", type=int, default=None, help="autoencoder steps (default: model.yaml's `vae: steps`)"
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=None,
        help="where the shapes sit in the pictures (default: model.yaml's `layout`; see ShapesWorld.layout)",
    )
    parser.add_argument(
        "--vae",
        default=None,
        metavar="SOURCE",
        help="use this autoencoder instead of training one: 'default' (the shipped model's: with it the script "
        "reproduces the shipped weights), a diffusers AutoencoderKL folder, or a Harmon model or pipeline folder",
    )
    parser.add_argument(
        "--captions",
        choices=CAPTIONS,
        default="all",
        help="pair captions of the stages: 'all' (both phrasings in every stage: the shipped recipe) or 'curriculum' "
        "(stages I-II name the left / top object first, stage III both phrasings; measured, not shipped: see the "
        "model card)",
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage (checks the script)")
    parser.add_argument("--ship", action="store_true", help="install the result as the package's default model")
    parser.add_argument("--eval", type=int, default=0, metavar="N", help="run ShapesEval on N scenes per kind")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="study: set a Trainer entry of every stage (YAML value), e.g. use_cpu=false to train on a GPU",
    )
    parser.add_argument(
        "--steps-scale", type=float, default=1.0, metavar="F", help="study: multiply every stage's max_steps by F"
    )
    parser.add_argument(
        "--model-set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="study: replace an entry of model.yaml, e.g. llm.num_hidden_layers=6",
    )
    args = parser.parse_args(argv)
    if not (args.steps_scale > 0 and args.steps_scale < float("inf")):
        parser.error(f"--steps-scale must be a positive number, got {args.steps_scale}")
    try:
        stage_settings = parse_assignments(args.set, "--set")
        model_settings = parse_assignments(args.model_set, "--model-set")
        model_yaml = apply_model_settings(load_yaml(CONFIGS / "model.yaml"), model_settings)
        check_position_init_std(model_yaml["mar"].get("position_init_std"))
        check_head_options(model_yaml["diffusion_head"])
        check_data_and_loss_options(model_yaml)
    except ValueError as error:
        parser.error(str(error))
    settings = {"set": stage_settings, "steps_scale": args.steps_scale, "model_set": model_settings}
    vae_yaml = model_yaml.get("vae", {})
    vae_steps = args.vae_steps if args.vae_steps is not None else int(vae_yaml.get("steps", VAETrainingConfig.steps))
    if vae_steps < 1:
        parser.error(f"--vae-steps must be at least 1, got {vae_steps}")
    try:
        vae_options = autoencoder_options(vae_yaml)
    except ValueError as error:
        parser.error(str(error))
    given_vae = None
    if args.vae is not None:
        if args.vae_steps is not None:
            parser.error("--vae takes an autoencoder, --vae-steps trains one: give only one of them")
        try:
            given_vae = load_autoencoder(args.vae)
        except ValueError as error:
            parser.error(str(error))

    out = Path(args.out)
    settings_file = out / "run_settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text(encoding="utf-8")) != settings:
        parser.error(f"{out} was started with other study settings ({settings_file}); use a new --out")
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    report: dict[str, Any] = {"seconds": {}, "settings": settings}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["seconds"][name] = round(now - clock, 1)
        clock = now

    layout = args.layout or model_yaml.get("layout", "random")
    data, world = make_data(
        out,
        200 if args.smoke else args.train,
        30 if args.smoke else args.test,
        args.seed,
        layout,
        model_yaml.get("kind_weights"),
    )
    lap("data")
    if given_vae is not None:
        try:
            vae_dir = take_autoencoder(out, given_vae, args.vae)
        except ValueError as error:
            parser.error(str(error))
    else:
        vae_dir = train_autoencoder(out, vae_steps, args.smoke, vae_options)
    lap("vae")
    stage0 = build_initial_model(out, data, vae_dir, args.seed, model_yaml)
    lap("stage0")
    final_stage = run_stages(out, data, stage0, args.smoke, args.captions, stage_settings, args.steps_scale)
    lap("stages")
    pipeline_dir = out / "harmon-shapes"
    report["weights_bytes"] = save_pipeline(final_stage, pipeline_dir, world.to_dict(), model_yaml)
    report["parameters"] = json.loads((stage0 / "parameters.json").read_text())
    lap("pipeline")
    report["total_minutes"] = round(sum(report["seconds"].values()) / 60, 1)
    log(f"pipeline -> {pipeline_dir} ({report['weights_bytes'] / 1e6:.1f} MB of weights)")
    if args.ship:
        ship(pipeline_dir)
    if args.eval:
        from harmon_hf.shapes.run_eval import evaluate_model

        device = "cuda" if torch.cuda.is_available() else "cpu"  # as `harmon-hf eval-shapes` picks it
        evaluate_model(pipeline_dir, n=args.eval, out_json=out / "shapes_eval.json", device=device)
        lap("eval")
    (out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"done: {report['seconds']}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
