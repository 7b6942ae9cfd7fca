"""LoRA fine-tuning of Harmon with PEFT: named target presets, a `LoraConfig` builder and a checked `get_peft_model`.

transformers' own adapter API (`model.add_adapter`, `load_adapter`) needs peft>=0.22, so Harmon goes through peft's
functions directly: `get_peft_model`, `PeftModel.from_pretrained`, `merge_and_unload` (see docs/lora.md).

A preset is an anchored regular expression: peft `fullmatch`es a string `target_modules` on the full module name.
A suffix list such as `["qkv", "q_proj"]` would be simpler but silently also matches modules of the VAE (its
attention has `to_q/to_k/to_v`, and suffixes grow), while the VAE must never be adapted: its encoder defines the
training targets and its decoder is shared by every adapter.

    from harmon_hf import HarmonForConditionalGeneration, get_harmon_peft_model

    model = HarmonForConditionalGeneration.from_pretrained("harmon-0.5b", subfolder="model")
    peft_model = get_harmon_peft_model(model, ["mar_decoder", "diffusion_head"], r=16, alpha=32)
    ...  # train; peft_model.save_pretrained("my-adapter") writes adapter_config.json + adapter_model.safetensors
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

# `(?:model\.)?`: the same presets fit `HarmonForConditionalGeneration` (`model.mar...`) and a bare `HarmonModel`
# (`mar...`); the patterns are still anchored, because peft full-matches them.
_ROOT = r"(?:model\.)?"

#: Preset name -> regular expression over full module names (each matches `nn.Linear` layers only).
LORA_PRESETS: dict[str, str] = {
    # every projection of the Qwen2 decoder layers (attention and MLP); embeddings / the tied lm_head stay as they are
    "llm": _ROOT + r"language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)",
    "llm_attention": _ROOT + r"language_model\.layers\.\d+\.self_attn\.(?:q|k|v|o)_proj",
    "mar_encoder": _ROOT + r"mar\.encoder_blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12])",
    "mar_decoder": _ROOT + r"mar\.decoder_blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12])",
    # all the head's linears: time / condition / input embeddings, the residual MLPs and their adaLN modulations
    "diffusion_head": _ROOT
    + r"diffusion_head\.(?:time_embed\.mlp\.[02]|cond_embed|input_proj"
    + r"|res_blocks\.\d+\.(?:mlp\.[02]|adaLN_modulation\.1)|final_layer\.(?:linear|adaLN_modulation\.1))",
    "projectors": _ROOT + r"proj_(?:in|out)\.[02]",
}

#: Presets made of other presets.
LORA_PRESET_GROUPS: dict[str, tuple[str, ...]] = {
    "mar": ("mar_encoder", "mar_decoder"),
    "all": ("llm", "mar_encoder", "mar_decoder", "diffusion_head", "projectors"),
}

#: Presets on the understanding (image -> text) path, which reads the image through the frozen VAE encoder, the MAR
#: encoder and `proj_in`, and answers with the LLM. Every preset is on the generation path.
UNDERSTANDING_PRESETS = ("llm", "llm_attention", "mar_encoder", "projectors")

_VAE = re.compile(r"(?:.*\.)?vae(?:\..*)?")


def lora_preset_names() -> list[str]:
    """All valid preset names (the basic presets, then the groups)."""
    return [*LORA_PRESETS, *LORA_PRESET_GROUPS]


def _as_list(presets: str | Iterable[str]) -> list[str]:
    names = [presets] if isinstance(presets, str) else list(presets)
    # "mar,diffusion_head" from a command line or a YAML string is the same as a list
    return [part.strip() for name in names for part in str(name).split(",") if part.strip()]


def expand_lora_presets(presets: str | Iterable[str]) -> list[str]:
    """Preset names (groups expanded, duplicates dropped, order kept) -> basic preset names.

    Raises `ValueError` naming the valid presets for an unknown name or an empty selection.
    """
    names = _as_list(presets)
    if not names:
        raise ValueError(f"No LoRA preset given; valid presets: {', '.join(lora_preset_names())}.")
    unknown = [n for n in names if n not in LORA_PRESETS and n not in LORA_PRESET_GROUPS]
    if unknown:
        raise ValueError(f"Unknown LoRA preset(s) {unknown}; valid presets: {', '.join(lora_preset_names())}.")
    basic = [part for n in names for part in LORA_PRESET_GROUPS.get(n, (n,))]
    return list(dict.fromkeys(basic))


def lora_target_regex(presets: str | Iterable[str]) -> str:
    """The `LoraConfig(target_modules=...)` regular expression of the union of `presets`."""
    return "(?:" + "|".join(LORA_PRESETS[name] for name in expand_lora_presets(presets)) + ")"


def check_lora_presets_for_tasks(presets: str | Iterable[str], tasks: Iterable[str]) -> None:
    """Raise `ValueError` when `presets` adapt nothing on the path of one of `tasks` ("image2text", "text2image").

    An understanding batch with, say, only `mar_decoder` adapters has a loss without gradient, which would stop
    training at the first such batch with an obscure autograd error.
    """
    basic = expand_lora_presets(presets)
    if "image2text" in tasks and not set(basic) & set(UNDERSTANDING_PRESETS):
        raise ValueError(
            f"LoRA presets {_as_list(presets)} adapt nothing that the image-to-text (understanding) loss reaches; add "
            f"one of {', '.join(UNDERSTANDING_PRESETS)} (or all), or train on generation data only."
        )


def harmon_lora_config(
    presets: str | Iterable[str] = "all",
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` adapting the modules of `presets` (names from `lora_preset_names()`).

    Args:
        presets: one preset name, a list, or a comma-separated string, e.g. `["mar_decoder", "diffusion_head"]`.
        r: LoRA rank.
        alpha: LoRA alpha (the update is scaled by alpha / r); default `2 * r`.
        dropout: dropout on the LoRA branch's input.
        kwargs: further `LoraConfig` fields (`use_rslora`, `init_lora_weights`, `layers_to_transform`, ...).

    The config has no `task_type`, so `get_peft_model` returns a plain `PeftModel` whose `forward` passes every
    argument (both Harmon tasks) straight to the model.
    """
    for key in ("target_modules", "lora_alpha", "lora_dropout"):
        if key in kwargs:
            raise TypeError(f"harmon_lora_config sets {key!r} itself (use presets / alpha / dropout)")
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(presets),
        bias="none",
        **kwargs,
    )


def lora_target_names(model: nn.Module, config: LoraConfig | str) -> list[str]:
    """Full names of the modules of `model` that `config` (a `LoraConfig` or a target regex) would adapt."""
    if isinstance(config, str):
        config = LoraConfig(target_modules=config)
    return [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]


def check_lora_targets(model: nn.Module, config: LoraConfig, presets: Sequence[str] | None = None) -> list[str]:
    """Validate `config` against `model` and return the names of the modules it adapts.

    Raises `ValueError` (listing the valid presets) when it adapts nothing, when one of `presets` matches no module
    of this model, or when it would adapt part of the VAE.
    """
    names = [name for name, _ in model.named_modules() if name]
    for preset in presets or ():
        pattern = re.compile(LORA_PRESETS[preset])
        if not any(pattern.fullmatch(name) for name in names):
            raise ValueError(
                f"LoRA preset {preset!r} matches no module of this {type(model).__name__}; "
                f"valid presets: {', '.join(lora_preset_names())}."
            )
    targets = lora_target_names(model, config)
    if not targets:
        raise ValueError(
            f"LoRA target_modules {config.target_modules!r} match no module of this {type(model).__name__}; use "
            f"harmon_lora_config with presets: {', '.join(lora_preset_names())}."
        )
    vae = [name for name in targets if _VAE.fullmatch(name)]
    if vae:
        raise ValueError(
            f"LoRA target_modules {config.target_modules!r} would adapt the VAE ({vae[:3]}...); the VAE is never "
            f"adapted. Use the presets: {', '.join(lora_preset_names())}."
        )
    return targets


def get_harmon_peft_model(
    model: nn.Module,
    presets_or_config: str | Iterable[str] | LoraConfig = "all",
    *,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> PeftModel:
    """Wrap a Harmon model for LoRA training: `peft.get_peft_model` after checking the targets.

    Args:
        model: a `HarmonForConditionalGeneration` (or `HarmonModel`). PEFT injects the LoRA layers into it in place
            and freezes every base parameter.
        presets_or_config: preset name(s) (see `lora_preset_names()`), or a ready `LoraConfig`.
        r, alpha, dropout, config_kwargs: passed to `harmon_lora_config` when presets are given.
        adapter_name: name of the adapter in the `PeftModel`.

    Returns the `PeftModel` (`save_pretrained` writes only `adapter_config.json` + `adapter_model.safetensors`).
    Raises `ValueError` for an unknown preset, targets matching no module, or targets inside the VAE.
    """
    if isinstance(presets_or_config, LoraConfig):
        config, presets = presets_or_config, None
    else:
        presets = expand_lora_presets(presets_or_config)
        config = harmon_lora_config(presets, r=r, alpha=alpha, dropout=dropout, **config_kwargs)
    check_lora_targets(model, config, presets)
    return get_peft_model(model, config, adapter_name=adapter_name)


__all__ = [
    "LORA_PRESETS",
    "LORA_PRESET_GROUPS",
    "UNDERSTANDING_PRESETS",
    "check_lora_presets_for_tasks",
    "check_lora_targets",
    "expand_lora_presets",
    "get_harmon_peft_model",
    "harmon_lora_config",
    "lora_preset_names",
    "lora_target_names",
    "lora_target_regex",
]
