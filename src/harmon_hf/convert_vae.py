"""Convert the upstream kl16 VAE checkpoint (`kl16.ckpt`, LDM key names) to a diffusers `AutoencoderKL`.

The upstream VAE (MAR's copy of the LDM KL autoencoder) keeps its modules under `encoder.*`, `decoder.*`,
`quant_conv.*` and `post_quant_conv.*`. diffusers' `AutoencoderKL` holds exactly the same computation with other
names, so conversion is a key rename plus one reshape: the single-head attention uses 1x1 convolutions
`(C, C, 1, 1)` upstream and linear layers `(C, C)` in diffusers.

We do not use diffusers' `convert_ldm_vae_checkpoint`: it ignores the attention blocks inside the encoder's last
down level, which kl16 has.

Public API: `load_upstream_vae`, `infer_vae_config`, `convert_vae_state_dict`, `build_vae`, `CheckpointError`, and
the inverse `upstream_vae_state_dict` (diffusers keys back to kl16 ones: export, round-trip tests, benchmarks).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .configuration_harmon import HarmonVAEConfig

__all__ = [
    "CheckpointError",
    "build_vae",
    "convert_vae_state_dict",
    "infer_vae_config",
    "load_upstream_vae",
    "upstream_vae_state_dict",
]

# GroupNorm group count of the LDM autoencoder; the weights do not record it.
_NORM_NUM_GROUPS = 32

# Keys every kl16-style checkpoint has; used to recognise one.
_REQUIRED_KEYS = (
    "encoder.conv_in.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.conv_out.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
)

# Leaf names inside a residual block / attention block, upstream -> diffusers.
_RESNET_PARAMS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN_PARAMS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Attention projections that are 1x1 convolutions upstream and nn.Linear in diffusers.
_ATTN_LINEAR = {"q", "k", "v", "proj_out"}

_RESNET = r"(?P<leaf>norm1|conv1|norm2|conv2|nin_shortcut)\.(?P<param>weight|bias)"
_ATTN = r"(?P<leaf>norm|q|k|v|proj_out)\.(?P<param>weight|bias)"
_PARAM = r"(?P<param>weight|bias)"

_RE_PLAIN = re.compile(
    r"^(?:encoder|decoder)\.(?:conv_in|conv_out)\.(?:weight|bias)$|^(?:post_)?quant_conv\.(?:weight|bias)$"
)
_RE_NORM_OUT = re.compile(rf"^(?P<part>encoder|decoder)\.norm_out\.{_PARAM}$")
_RE_ENC_BLOCK = re.compile(rf"^encoder\.down\.(?P<level>\d+)\.block\.(?P<idx>\d+)\.{_RESNET}$")
_RE_ENC_ATTN = re.compile(rf"^encoder\.down\.(?P<level>\d+)\.attn\.(?P<idx>\d+)\.{_ATTN}$")
_RE_ENC_DOWN = re.compile(rf"^encoder\.down\.(?P<level>\d+)\.downsample\.conv\.{_PARAM}$")
_RE_DEC_BLOCK = re.compile(rf"^decoder\.up\.(?P<level>\d+)\.block\.(?P<idx>\d+)\.{_RESNET}$")
_RE_DEC_UP = re.compile(rf"^decoder\.up\.(?P<level>\d+)\.upsample\.conv\.{_PARAM}$")
_RE_MID_BLOCK = re.compile(rf"^(?P<part>encoder|decoder)\.mid\.block_(?P<idx>[12])\.{_RESNET}$")
_RE_MID_ATTN = re.compile(rf"^(?P<part>encoder|decoder)\.mid\.attn_1\.{_ATTN}$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or converted. The message is one line, fit to show a CLI user as is."""


def _list_keys(keys: object, limit: int = 10) -> str:
    """`a, b, c (+N more)`: keeps error messages on one readable line."""
    keys = sorted(keys)  # type: ignore[arg-type]
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_upstream_vae(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an upstream kl16 VAE checkpoint.

    Accepts `torch.save({"model": state_dict})` (the released `kl16.ckpt`) or a bare state dict. Only tensors are
    unpickled (`weights_only=True`).

    Returns:
        The upstream state dict, keys `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`.

    Raises:
        CheckpointError: the file is missing, unreadable (truncated, corrupt, not a torch file), or does not hold
            a kl16-style VAE state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"VAE checkpoint {path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot read VAE checkpoint {path} (truncated, corrupt or not a torch checkpoint): "
            f"{type(err).__name__}: {detail}"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} is not a VAE checkpoint: expected a state dict or {{'model': state_dict}}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path} is not a VAE checkpoint: non-tensor entries {_list_keys(not_tensors)}")
    state_dict = dict(obj)
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        hint = ""
        if any(k.startswith(("mar.", "llm.")) for k in state_dict):
            hint = " (this looks like a Harmon model checkpoint; pass the kl16.ckpt VAE file)"
        raise CheckpointError(f"{path} is not a kl16 VAE checkpoint: missing {_list_keys(missing)}{hint}")
    return state_dict


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by the first group of `pattern` over the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"the VAE checkpoint lacks {key}")
    return tuple(state_dict[key].shape)


def infer_vae_config(upstream_state_dict: Mapping[str, torch.Tensor]) -> HarmonVAEConfig:
    """Infer the `AutoencoderKL` layout of a kl16-style upstream state dict from its key names and shapes.

    Reads: the level count and widths (`encoder.down.{i}.block.0.conv1.weight`: `(C_i, C_in, 3, 3)`), the residual
    blocks per encoder level (`layers_per_block`; each decoder level must have one more), the latent channels
    (`post_quant_conv.weight`: `(L, L, 1, 1)`, with `quant_conv` `(2L, 2L, 1, 1)`), the in/out image channels, and
    where attention sits. The GroupNorm group count is not stored in the weights; it is the LDM value 32.

    Raises:
        CheckpointError: a layout this converter does not support (attention outside the last encoder level or in
            a decoder level, widths that 32 groups cannot split, inconsistent block counts or shapes).
    """
    sd = upstream_state_dict
    for key in _REQUIRED_KEYS:
        _shape(sd, key)

    enc_levels = _indices(sd, r"^encoder\.down\.(\d+)\.")
    dec_levels = _indices(sd, r"^decoder\.up\.(\d+)\.")
    if not enc_levels or enc_levels != list(range(len(enc_levels))):
        raise CheckpointError(f"the VAE encoder levels are {enc_levels}, expected 0..n-1")
    if dec_levels != enc_levels:
        raise CheckpointError(f"the VAE has encoder levels {enc_levels} but decoder levels {dec_levels}")
    n = len(enc_levels)

    block_out_channels = [_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n)]
    blocks = {i: _indices(sd, rf"^encoder\.down\.{i}\.block\.(\d+)\.") for i in range(n)}
    layers_per_block = len(blocks[0])
    for i, idx in blocks.items():
        if idx != list(range(layers_per_block)):
            raise CheckpointError(
                f"encoder level {i} has residual blocks {idx}; every level needs 0..{layers_per_block - 1}"
            )
    for i in range(n):
        idx = _indices(sd, rf"^decoder\.up\.{i}\.block\.(\d+)\.")
        if idx != list(range(layers_per_block + 1)):
            raise CheckpointError(
                f"decoder level {i} has residual blocks {idx}; expected layers_per_block + 1 = "
                f"{layers_per_block + 1} (0..{layers_per_block})"
            )
        # diffusers builds the decoder with the same widths as the encoder, level for level.
        dec_width = _shape(sd, f"decoder.up.{i}.block.0.conv1.weight")[0]
        if dec_width != block_out_channels[i]:
            raise CheckpointError(
                f"decoder level {i} has width {dec_width} but encoder level {i} has {block_out_channels[i]}; "
                "AutoencoderKL needs the same widths in both"
            )

    # Resampling: every level but the last downsamples; every level but the first upsamples.
    down = _indices(sd, r"^encoder\.down\.(\d+)\.downsample\.")
    up = _indices(sd, r"^decoder\.up\.(\d+)\.upsample\.")
    if down != list(range(n - 1)) or up != list(range(1, n)):
        raise CheckpointError(
            f"resampling convs at encoder levels {down} / decoder levels {up}; expected {list(range(n - 1))} / "
            f"{list(range(1, n))}"
        )

    # Attention: upstream places it after every residual block of the levels at `attn_resolutions`; kl16 has it
    # in the last (lowest-resolution) encoder level only, the layout checked against upstream.
    attn_levels = _indices(sd, r"^encoder\.down\.(\d+)\.attn\.")
    if attn_levels not in ([], [n - 1]):
        raise CheckpointError(
            f"the VAE encoder has attention in levels {attn_levels}; only attention in the last level "
            f"({n - 1}, the kl16 layout) is supported"
        )
    if attn_levels:
        idx = _indices(sd, rf"^encoder\.down\.{n - 1}\.attn\.(\d+)\.")
        if idx != list(range(layers_per_block)):
            raise CheckpointError(
                f"encoder level {n - 1} has attention blocks {idx}; expected one after each of its "
                f"{layers_per_block} residual blocks"
            )
    dec_attn = _indices(sd, r"^decoder\.up\.(\d+)\.attn\.")
    if dec_attn:
        raise CheckpointError(
            f"the VAE decoder has attention in levels {dec_attn}; only decoders without level attention (kl16) are "
            "supported"
        )
    mid_attn = {part: any(k.startswith(f"{part}.mid.attn_1.") for k in sd) for part in ("encoder", "decoder")}
    if mid_attn["encoder"] != mid_attn["decoder"]:
        raise CheckpointError(
            "the VAE has mid-block attention in only one of encoder/decoder; AutoencoderKL needs both or neither"
        )

    latent_channels = _shape(sd, "post_quant_conv.weight")[0]
    expected = {
        "post_quant_conv.weight": (latent_channels, latent_channels, 1, 1),
        # A diagonal Gaussian: quant_conv maps 2L moments to 2L moments (mean, log-variance).
        "quant_conv.weight": (2 * latent_channels, 2 * latent_channels, 1, 1),
    }
    for key, shape in expected.items():
        if _shape(sd, key) != shape:
            raise CheckpointError(f"{key} has shape {_shape(sd, key)}, expected {shape} (a KL VAE with double_z)")

    bad = [c for c in block_out_channels if c % _NORM_NUM_GROUPS]
    if bad:
        raise CheckpointError(
            f"VAE widths {block_out_channels} are not all multiples of {_NORM_NUM_GROUPS} (the GroupNorm group "
            "count of the LDM autoencoder); this is not a kl16-style VAE"
        )

    config = HarmonVAEConfig(
        in_channels=_shape(sd, "encoder.conv_in.weight")[1],
        out_channels=_shape(sd, "decoder.conv_out.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * (n - 1)
        + ["AttnDownEncoderBlock2D" if attn_levels else "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=_NORM_NUM_GROUPS,
        mid_block_add_attention=mid_attn["encoder"],
    )
    # Every other shape (in-block widths, shortcut convs, attention sizes) must fit the inferred layout too.
    _check_state_dict(config, convert_vae_state_dict(sd))
    return config


def _convert_key(key: str, num_levels: int) -> tuple[str, bool] | None:
    """Map one upstream key to its `AutoencoderKL` name; the flag marks 1x1-conv weights that become linear.

    `num_levels` is needed for the decoder: upstream indexes `decoder.up` by resolution level (up.0 = full
    resolution, run last) while diffusers indexes `up_blocks` in execution order, so up.i -> up_blocks.(n-1-i).
    """
    if _RE_PLAIN.match(key):
        return key, False
    if m := _RE_NORM_OUT.match(key):
        return f"{m['part']}.conv_norm_out.{m['param']}", False
    if m := _RE_ENC_BLOCK.match(key):
        return f"encoder.down_blocks.{m['level']}.resnets.{m['idx']}.{_RESNET_PARAMS[m['leaf']]}.{m['param']}", False
    if m := _RE_ENC_ATTN.match(key):
        new = f"encoder.down_blocks.{m['level']}.attentions.{m['idx']}.{_ATTN_PARAMS[m['leaf']]}.{m['param']}"
        return new, m["leaf"] in _ATTN_LINEAR and m["param"] == "weight"
    if m := _RE_ENC_DOWN.match(key):
        return f"encoder.down_blocks.{m['level']}.downsamplers.0.conv.{m['param']}", False
    if m := _RE_DEC_BLOCK.match(key):
        block = num_levels - 1 - int(m["level"])
        return f"decoder.up_blocks.{block}.resnets.{m['idx']}.{_RESNET_PARAMS[m['leaf']]}.{m['param']}", False
    if m := _RE_DEC_UP.match(key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m['level'])}.upsamplers.0.conv.{m['param']}", False
    if m := _RE_MID_BLOCK.match(key):
        return f"{m['part']}.mid_block.resnets.{int(m['idx']) - 1}.{_RESNET_PARAMS[m['leaf']]}.{m['param']}", False
    if m := _RE_MID_ATTN.match(key):
        new = f"{m['part']}.mid_block.attentions.0.{_ATTN_PARAMS[m['leaf']]}.{m['param']}"
        return new, m["leaf"] in _ATTN_LINEAR and m["param"] == "weight"
    return None


def convert_vae_state_dict(upstream_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an upstream kl16 state dict to diffusers `AutoencoderKL` keys.

    Renames (n = number of levels): `encoder.down.i.block.k` -> `encoder.down_blocks.i.resnets.k`,
    `encoder.down.i.attn.k` -> `encoder.down_blocks.i.attentions.k`, `downsample` -> `downsamplers.0`,
    `decoder.up.i` -> `decoder.up_blocks.(n-1-i)` (`upsample` -> `upsamplers.0`), `mid.block_1/2` ->
    `mid_block.resnets.0/1`, `mid.attn_1` -> `mid_block.attentions.0`, `nin_shortcut` -> `conv_shortcut`,
    `norm_out` -> `conv_norm_out`; in attention `norm` -> `group_norm`, `q/k/v` -> `to_q/to_k/to_v`,
    `proj_out` -> `to_out.0`, and their weights `(C, C, 1, 1)` -> `(C, C)`. Other tensors are passed through
    unchanged (not copied).

    Raises:
        CheckpointError: some keys match no rule (listed; nothing is dropped silently), or an attention weight is
            not a 1x1 convolution.
    """
    num_levels = len(_indices(upstream_state_dict, r"^decoder\.up\.(\d+)\."))
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in upstream_state_dict.items():
        mapped = _convert_key(key, num_levels)
        if mapped is None:
            unmapped.append(key)
            continue
        new_key, to_linear = mapped
        if to_linear:
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                # A 1x1 conv over (B, C, H, W) is a linear map over C: drop the kernel dims (copy, to not alias).
                value = value.reshape(value.shape[0], value.shape[1]).clone()
            elif value.ndim != 2:  # already linear is fine; anything else is not this architecture
                raise CheckpointError(f"{key} has shape {tuple(value.shape)}, expected a 1x1 conv (C, C, 1, 1)")
        converted[new_key] = value
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} VAE checkpoint keys have no diffusers name: {_list_keys(unmapped)}")
    return converted


_INV_RESNET_PARAMS = {v: k for k, v in _RESNET_PARAMS.items()}
_INV_ATTN_PARAMS = {v: k for k, v in _ATTN_PARAMS.items()}
_RE_INV_RESNET = r"(?P<leaf>norm1|conv1|norm2|conv2|conv_shortcut)\.(?P<param>weight|bias)"
_RE_INV_ATTN = r"(?P<leaf>group_norm|to_q|to_k|to_v|to_out\.0)\.(?P<param>weight|bias)"
_INVERSE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), template)
    for pattern, template in (
        (
            rf"^encoder\.down_blocks\.(?P<level>\d+)\.resnets\.(?P<idx>\d+)\.{_RE_INV_RESNET}$",
            "encoder.down.{level}.block.{idx}",
        ),
        (
            rf"^encoder\.down_blocks\.(?P<level>\d+)\.attentions\.(?P<idx>\d+)\.{_RE_INV_ATTN}$",
            "encoder.down.{level}.attn.{idx}",
        ),
        (
            rf"^encoder\.down_blocks\.(?P<level>\d+)\.downsamplers\.0\.conv\.{_PARAM}$",
            "encoder.down.{level}.downsample.conv",
        ),
        (
            rf"^decoder\.up_blocks\.(?P<level>\d+)\.resnets\.(?P<idx>\d+)\.{_RE_INV_RESNET}$",
            "decoder.up.{up}.block.{idx}",
        ),
        (rf"^decoder\.up_blocks\.(?P<level>\d+)\.upsamplers\.0\.conv\.{_PARAM}$", "decoder.up.{up}.upsample.conv"),
        (
            rf"^(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<idx>[01])\.{_RE_INV_RESNET}$",
            "{part}.mid.block_{mid}",
        ),
        (rf"^(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.{_RE_INV_ATTN}$", "{part}.mid.attn_1"),
        (rf"^(?P<part>encoder|decoder)\.conv_norm_out\.{_PARAM}$", "{part}.norm_out"),
    )
)


def upstream_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `convert_vae_state_dict`: an `AutoencoderKL` state dict with kl16 (LDM) key names, attention
    weights `(C, C)` back to 1x1 convolutions `(C, C, 1, 1)` (views). Raises `CheckpointError` on unknown keys."""
    num_levels = len(_indices(state_dict, r"^decoder\.up_blocks\.(\d+)\."))
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if _RE_PLAIN.match(key):
            out[key] = value
            continue
        for pattern, template in _INVERSE_RULES:
            if m := pattern.match(key):
                groups = m.groupdict()
                level = int(groups.get("level") or 0)
                prefix = template.format(
                    level=level,
                    up=num_levels - 1 - level,
                    idx=groups.get("idx"),
                    mid=int(groups.get("idx") or 0) + 1,
                    part=groups.get("part"),
                )
                leaf = groups.get("leaf")
                if leaf is None:
                    out[f"{prefix}.{m['param']}"] = value
                elif leaf in _INV_ATTN_PARAMS:
                    name = _INV_ATTN_PARAMS[leaf]
                    if name in _ATTN_LINEAR and m["param"] == "weight":
                        value = value.reshape(*value.shape, 1, 1)
                    out[f"{prefix}.{name}.{m['param']}"] = value
                else:
                    out[f"{prefix}.{_INV_RESNET_PARAMS[leaf]}.{m['param']}"] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} AutoencoderKL keys have no kl16 name: {_list_keys(unmapped)}")
    return out


def _check_state_dict(config: HarmonVAEConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise `CheckpointError` unless `state_dict` has exactly the keys and shapes of `AutoencoderKL(config)`."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = AutoencoderKL(**config.to_autoencoder_kwargs()).state_dict()
    missing = reference.keys() - state_dict.keys()
    unexpected = state_dict.keys() - reference.keys()
    problems = []
    if missing:
        problems.append(f"missing {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {_list_keys(unexpected)}")
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in sorted(reference.keys() & state_dict.keys())
        if tuple(state_dict[k].shape) != tuple(reference[k].shape)
    ]
    if mismatched:
        problems.append(f"shape mismatch {_list_keys(mismatched, limit=5)}")
    if problems:
        raise CheckpointError(f"the VAE weights do not fit the AutoencoderKL layout: {'; '.join(problems)}")


def build_vae(config: HarmonVAEConfig, state_dict: Mapping[str, torch.Tensor]) -> AutoencoderKL:
    """Build a float32 `AutoencoderKL` from `config` and load a converted (diffusers-keyed) state dict strictly.

    Raises:
        CheckpointError: missing or unexpected keys, or shape mismatches (all listed in one message).
    """
    _check_state_dict(config, state_dict)
    with torch.device("meta"):  # skip the random init: every parameter is overwritten below
        vae = AutoencoderKL(**config.to_autoencoder_kwargs())
    # assign=True adopts these tensors as the parameters: copy (and cast to float32) so the module never aliases
    # the caller's tensors.
    weights = {k: v.to(torch.float32, copy=True) for k, v in state_dict.items()}
    vae.load_state_dict(weights, strict=True, assign=True)
    return vae.eval()
