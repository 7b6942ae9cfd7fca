"""Convert the upstream Harmon checkpoints (`harmon_*.pth` + `kl16.ckpt` + a Qwen2.5 directory) to a harmon-hf folder.

Output (a diffusers pipeline folder; see docs/converting.md):

    <output>/model_index.json    HarmonPipeline components
    <output>/model/              HarmonForConditionalGeneration (config.json + model.safetensors)
    <output>/scheduler/          HarmonDDPMScheduler (the diffusion head's 100-step sampler)
    <output>/processor/          HarmonProcessor (tokenizer with <image>, image processor, chat template)

Usage: `harmon-hf convert --checkpoint harmon_0.5b.pth --vae kl16.ckpt --llm Qwen2.5-0.5B-Instruct --output out`
(or `python -m harmon_hf.convert ...`). Sizes are inferred from the checkpoint shapes; nothing is written unless the
whole conversion succeeds (the folder is assembled in a temporary directory and renamed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .configuration_harmon import HarmonConfig, HarmonVAEConfig
from .convert_vae import CheckpointError, convert_vae_state_dict, infer_vae_config, load_upstream_vae

# Upstream key prefix -> our key prefix. Order matters: the most specific first; `None` drops the key.
KEY_MAPPING: list[tuple[str, str | None]] = [
    (r"^llm\.model\.", "model.language_model."),
    (r"^llm\.lm_head\.", "lm_head."),
    (r"^mar\.diffloss\.net\.", "model.diffusion_head."),
    (r"^mar\.class_emb\.", None),  # MAR's class embedding: present in the checkpoint, unused by Harmon
    (r"^mar\.", "model.mar."),
    (r"^proj_in\.", "model.proj_in."),
    (r"^proj_out\.", "model.proj_out."),
]

# MAR widths whose head counts are known from the MAR releases (Base, Large, Huge).
KNOWN_MAR_HEADS = {768: 12, 1024: 16, 1280: 16}

_MODEL_FILES = ("model_index.json", "config.json", "model.safetensors", "model.safetensors.index.json")


def load_upstream_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read `harmon_*.pth` (a flat name -> tensor dict; `{"state_dict": ...}`/`{"model": ...}` wrappers accepted)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for corrupt files
        try:  # older (non-zip) torch.save files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err2:
            raise CheckpointError(
                f"cannot read checkpoint {path} (truncated, or not a torch.save file?): {type(err2).__name__}: {err2}"
            ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a Harmon checkpoint (expected a dict of tensors)")
    if not any(k.startswith("mar.") for k in obj) or not any(k.startswith("llm.model.") for k in obj):
        raise CheckpointError(
            f"{path} is not a Harmon checkpoint: no 'mar.*' or 'llm.model.*' keys (first keys: {list(obj)[:3]})"
        )
    return obj


def convert_state_dict(upstream: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename upstream Harmon keys (everything but the VAE) to ours. Raises on keys no rule covers."""
    out, unknown = {}, []
    for key, value in upstream.items():
        for pattern, repl in KEY_MAPPING:
            if re.match(pattern, key):
                if repl is not None:
                    out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in the Harmon checkpoint: {', '.join(sorted(unknown)[:10])}")
    return out


# Our key prefix -> upstream's (the inverse of KEY_MAPPING, for export and for fabricating upstream checkpoints).
INVERSE_KEY_MAPPING: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "llm.model."),
    (r"^lm_head\.", "llm.lm_head."),
    (r"^model\.diffusion_head\.", "mar.diffloss.net."),
    (r"^model\.mar\.", "mar."),
    (r"^model\.proj_in\.", "proj_in."),
    (r"^model\.proj_out\.", "proj_out."),
]


def upstream_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a `HarmonForConditionalGeneration` state dict into upstream checkpoints: `(harmon, vae)` with the
    `harmon_*.pth` keys (tied `lm_head` written out as upstream saves it) and the kl16 ones. Tensors are not copied
    (attention weights of the VAE become 1x1-conv views). MAR's unused `class_emb` is not recreated."""
    from .convert_vae import upstream_vae_state_dict

    harmon, vae, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith("model.vae."):
            vae[key.removeprefix("model.vae.")] = value
            continue
        for pattern, repl in INVERSE_KEY_MAPPING:
            if re.match(pattern, key):
                harmon[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys with no upstream name: {', '.join(sorted(unknown)[:10])}")
    if "llm.lm_head.weight" not in harmon:
        harmon["llm.lm_head.weight"] = harmon["llm.model.embed_tokens.weight"]
    return harmon, upstream_vae_state_dict(vae)


def _count_blocks(keys, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _mar_heads(dim: int) -> int:
    if dim in KNOWN_MAR_HEADS:
        return KNOWN_MAR_HEADS[dim]
    # Unknown widths (e.g. test models): 64-wide heads as in MAR, 16-wide ones below 128.
    head_dim = 64 if dim % 64 == 0 and dim >= 128 else 16
    if dim % head_dim:
        raise CheckpointError(f"cannot infer the MAR head count for width {dim}; pass --mar-num-heads")
    return dim // head_dim


def infer_harmon_config(
    upstream: dict[str, torch.Tensor],
    text_config,
    vae_config: HarmonVAEConfig,
    image_token_id: int,
    mar_num_heads: int | None = None,
) -> HarmonConfig:
    """Build the `HarmonConfig` from the checkpoint shapes, checking them against the LLM config."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in upstream:
            raise CheckpointError(f"the Harmon checkpoint lacks {key}")
        return tuple(upstream[key].shape)

    keys = list(upstream)
    enc, token_dim = shape("mar.z_proj.weight")
    dec = shape("mar.decoder_embed.weight")[0]
    seq = shape("mar.diffusion_pos_embed_learned")[1]
    buffer = shape("mar.encoder_pos_embed_learned")[1] - seq
    grid = math.isqrt(seq)
    if grid * grid != seq:
        raise CheckpointError(f"the MAR position table has {seq} image rows, not a square grid")
    patch = math.isqrt(token_dim // vae_config.latent_channels)
    if patch * patch * vae_config.latent_channels != token_dim:
        raise CheckpointError(
            f"the MAR takes {token_dim}-dim tokens, which does not fit the VAE's {vae_config.latent_channels} latent "
            "channels: the --vae checkpoint does not belong to this Harmon checkpoint"
        )
    mlp_hidden = shape("mar.encoder_blocks.0.mlp.fc1.weight")[0]
    head_width, head_in = shape("mar.diffloss.net.input_proj.weight")
    head_out = shape("mar.diffloss.net.final_layer.linear.weight")[0]

    vocab, hidden = shape("llm.model.embed_tokens.weight")
    n_layers = _count_blocks(keys, "llm.model.layers.")
    llm_expect = (text_config.vocab_size, text_config.hidden_size, text_config.num_hidden_layers)
    if (vocab, hidden, n_layers) != llm_expect:
        raise CheckpointError(
            f"--llm config (vocab {llm_expect[0]}, hidden {llm_expect[1]}, {llm_expect[2]} layers) does not match the "
            f"checkpoint's LLM (vocab {vocab}, hidden {hidden}, {n_layers} layers)"
        )
    if shape("proj_in.0.weight") != (hidden, enc):
        raise CheckpointError(f"proj_in.0.weight has shape {shape('proj_in.0.weight')}, expected {(hidden, enc)}")
    if image_token_id >= vocab:
        raise CheckpointError(f"<image> got id {image_token_id}, outside the LLM's {vocab}-row embedding table")

    tied = "llm.lm_head.weight" not in upstream or torch.equal(
        upstream["llm.lm_head.weight"], upstream["llm.model.embed_tokens.weight"]
    )
    text = text_config.to_dict()
    text.pop("_name_or_path", None)  # the local --llm path: not part of the model (and it made outputs differ)
    text["tie_word_embeddings"] = bool(tied)
    mar_config = dict(
        token_dim=token_dim,
        patch_size=patch,
        grid_size=grid,
        buffer_size=buffer,
        encoder_embed_dim=enc,
        encoder_depth=_count_blocks(keys, "mar.encoder_blocks."),
        encoder_num_heads=mar_num_heads or _mar_heads(enc),
        decoder_embed_dim=dec,
        decoder_depth=_count_blocks(keys, "mar.decoder_blocks."),
        decoder_num_heads=mar_num_heads or _mar_heads(dec),
        mlp_ratio=mlp_hidden / enc,
    )
    head_config = dict(
        in_channels=head_in,
        model_channels=head_width,
        num_res_blocks=_count_blocks(keys, "mar.diffloss.net.res_blocks."),
        cond_channels=shape("mar.diffloss.net.cond_embed.weight")[1],
        frequency_embedding_size=shape("mar.diffloss.net.time_embed.mlp.0.weight")[1],
        learn_sigma=head_out == 2 * head_in,
    )
    return HarmonConfig(
        text_config=text,
        mar_config=mar_config,
        diffusion_head_config=head_config,
        vae_config=vae_config.to_dict(),
        image_token_id=image_token_id,
        image_size=grid * vae_config.downsample_factor * patch,
        tie_word_embeddings=bool(tied),
    )


def _set_default_permissions(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain `mkdir` / `open` would (0o777 / 0o666 minus the umask):
    `mkdtemp` creates 0o700 and transformers writes its shards 0o600, which would hide the model from other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _holds_model(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in _MODEL_FILES + ("model",))


def convert(
    checkpoint: str | os.PathLike,
    vae: str | os.PathLike,
    llm: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
    mar_num_heads: int | None = None,
    verbose: bool = True,
    default_image_size: int | None = None,
) -> Path:
    """Convert upstream checkpoints into a harmon-hf pipeline folder at `output`. Returns the folder.

    `default_image_size` is the pipeline's default height/width; by default 512 for models trained at 256 px (the
    released checkpoints: upstream samples at 512 through the resized position tables), else the trained size.

    Raises `CheckpointError` (a `ValueError`) with a one-line message on any bad input; `output` is left untouched.
    """
    from transformers import AutoConfig

    from .modeling_harmon import HarmonForConditionalGeneration
    from .pipeline_harmon import HarmonPipeline
    from .processing_harmon import HarmonProcessor
    from .scheduling_harmon import HarmonDDPMScheduler

    start = time.perf_counter()
    output = Path(output)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if _holds_model(output) and not overwrite:
        raise CheckpointError(f"{output} already holds a model; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"{output} exists and is not a directory")
    if output.is_dir() and not _holds_model(output) and any(output.iterdir()):
        # the folder is replaced as a whole at the end: never delete files that are not a model
        raise CheckpointError(f"{output} is a non-empty folder that holds no model; choose a new or empty folder")
    llm = Path(llm)
    if not (llm / "config.json").is_file():
        raise CheckpointError(f"--llm {llm} is not a Qwen2.5 directory (no config.json)")
    try:
        text_config = AutoConfig.from_pretrained(llm)
    except Exception as err:
        raise CheckpointError(f"--llm {llm}: cannot read config.json ({err})") from None
    if text_config.model_type != "qwen2":
        raise CheckpointError(f"--llm {llm} holds a {text_config.model_type!r} model, expected a Qwen2.5 ('qwen2') one")

    upstream = load_upstream_checkpoint(checkpoint)
    vae_upstream = load_upstream_vae(vae)
    vae_config = infer_vae_config(vae_upstream)
    processor = HarmonProcessor.from_llm_dir(llm, image_size=None, buffer_size=None)
    config = infer_harmon_config(
        upstream, text_config, vae_config, processor.tokenizer.convert_tokens_to_ids("<image>"), mar_num_heads
    )
    # The processor's placeholder count depends on the model's resolution and buffer: rebuild it with them.
    processor = HarmonProcessor.from_llm_dir(llm, image_size=config.image_size, buffer_size=config.buffer_size)

    state = convert_state_dict(upstream)
    state.update({f"model.vae.{k}": v for k, v in convert_vae_state_dict(vae_upstream).items()})
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    torch_dtype = getattr(torch, dtype)
    # Build without allocating or initialising weights, then assign the checkpoint tensors (one copy in memory).
    with torch.device("meta"):
        model = HarmonForConditionalGeneration(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the inferred model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    ref = model.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(ref[key].shape):
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(ref[key].shape)}"
            )
        # The VAE stays float32 (HarmonPreTrainedModel keeps it so under any dtype).
        target = torch.float32 if key.startswith("model.vae.") else torch_dtype
        if value.dtype != target:
            state[key] = value.to(target)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.config.dtype = torch_dtype
    # batched `generate` pads finished rows; the tokenizer's pad token (Qwen: <|endoftext|>) instead of a warning
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    if default_image_size is None:
        default_image_size = 512 if config.image_size == 256 else config.image_size
    pipe = HarmonPipeline(
        model=model, scheduler=HarmonDDPMScheduler(), processor=processor, default_image_size=default_image_size
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        pipe.save_pretrained(tmp)
        (tmp / "model" / "conversion.json").write_text(
            json.dumps(
                {"checkpoint": Path(checkpoint).name, "vae": Path(vae).name, "llm": llm.name, "dtype": dtype},
                indent=2,
            )
            + "\n"
        )
        _set_default_permissions(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"wrote {output} ({n_params / 1e6:.1f}M parameters, {dtype}) in {time.perf_counter() - start:.1f}s: "
            + ", ".join(sorted(p.name for p in output.iterdir()))
        )
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="upstream Harmon checkpoint (harmon_0.5b.pth, ...)")
    parser.add_argument("--vae", required=True, help="upstream VAE checkpoint (kl16.ckpt)")
    parser.add_argument("--llm", required=True, help="local Qwen2.5-Instruct directory (config + tokenizer files)")
    parser.add_argument("--output", "-o", required=True, help="output folder (a HarmonPipeline folder)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    parser.add_argument("--mar-num-heads", type=int, default=None, help="override the inferred MAR head count")
    parser.add_argument(
        "--default-image-size",
        type=int,
        default=None,
        help="the pipeline's default height/width in pixels (default: 512 for models trained at 256 px, as upstream "
        "samples; else the trained size)",
    )


def run(args: argparse.Namespace) -> int:
    convert(
        args.checkpoint,
        args.vae,
        args.llm,
        args.output,
        args.dtype,
        args.overwrite,
        args.mar_num_heads,
        default_image_size=args.default_image_size,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmon_hf.convert", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
