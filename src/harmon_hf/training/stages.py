"""Which parameters train in each Harmon training stage.

The stage presets (`examples/configs/stage*.yaml`) name the trainable parts with `trainable_modules`; everything
else is frozen, and the VAE is frozen in every stage:

| preset | trainable_modules | what trains |
|---|---|---|
| stage 1, alignment | `[mar, diffusion_head, projectors]` | MAR, diffusion head, proj_in/out; LLM frozen |
| stage 2, full | `[all]` | everything but the VAE |
| stage 3, high quality (512 px) | `[all]` | everything but the VAE |
| decoder_only (as harmon_1.5b-o) | `[mar_decoder]` | the MAR decoder only |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

# Parameter-name prefixes (relative to `HarmonForConditionalGeneration`) of each named group.
_MAR_ENCODER = ("z_proj.", "z_proj_ln.", "fake_latent", "encoder_pos_embed_learned", "encoder_blocks.", "encoder_norm.")
_MAR_DECODER = (
    "decoder_embed.",
    "mask_token",
    "decoder_pos_embed_learned",
    "decoder_blocks.",
    "decoder_norm.",
    "diffusion_pos_embed_learned",
)
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "llm": ("model.language_model.", "lm_head."),
    "mar": ("model.mar.",),
    "mar_encoder": tuple(f"model.mar.{p}" for p in _MAR_ENCODER),
    "mar_decoder": tuple(f"model.mar.{p}" for p in _MAR_DECODER),
    "diffusion_head": ("model.diffusion_head.",),
    "proj_in": ("model.proj_in.",),
    "proj_out": ("model.proj_out.",),
    "projectors": ("model.proj_in.", "model.proj_out."),
}
VAE_PREFIX = "model.vae."


def _strip_wrappers(name: str) -> str:
    # DDP / PEFT wrappers add prefixes; match on the Harmon-relative name.
    for marker in (
        "model.language_model.",
        "model.mar.",
        "model.diffusion_head.",
        "model.proj_",
        "model.vae.",
        "lm_head.",
    ):
        position = name.find(marker)
        if position >= 0:
            return name[position:]
    return name


def _entry_prefixes(module: str) -> tuple[str, ...]:
    if module == "all":
        return tuple(p for group in ("llm", "mar", "diffusion_head", "projectors") for p in MODULE_GROUPS[group])
    if module in MODULE_GROUPS:
        return MODULE_GROUPS[module]
    if module == "vae" or module.startswith(VAE_PREFIX) or VAE_PREFIX.startswith(module):
        raise ValueError(f"trainable_modules entry {module!r} would train the VAE, which is frozen in every stage.")
    return (module,)


def resolve_trainable_prefixes(modules: Sequence[str]) -> tuple[str, ...]:
    """Group names (`all`, `llm`, `mar`, `mar_encoder`, `mar_decoder`, `diffusion_head`, `proj_in`, `proj_out`,
    `projectors`) or raw parameter-name prefixes -> parameter-name prefixes. The VAE cannot be trained."""
    return tuple(dict.fromkeys(p for module in modules for p in _entry_prefixes(module)))


def set_trainable_modules(model: nn.Module, modules: Sequence[str] | None) -> dict[str, int]:
    """Freeze every parameter of a `HarmonForConditionalGeneration` except those of `modules` (see
    `resolve_trainable_prefixes`); the VAE is always frozen. `None` or `["all"]` trains everything but the VAE.

    Returns `{"trainable": n, "frozen": n, "total": n}` parameter counts (tied weights counted once).
    Raises `ValueError` for an entry that matches no parameter.
    """
    entries = {module: _entry_prefixes(module) for module in (modules or ["all"])}
    prefixes = tuple(p for group in entries.values() for p in group)
    relative_names = [_strip_wrappers(name) for name, _ in model.named_parameters()]
    unused = [m for m, group in entries.items() if not any(n.startswith(group) for n in relative_names)]
    if unused:
        raise ValueError(f"trainable_modules entries {unused} match no parameter of the model.")
    for (_, param), relative in zip(model.named_parameters(), relative_names):
        param.requires_grad_(relative.startswith(prefixes) and not relative.startswith(VAE_PREFIX))
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """`{"trainable", "frozen", "total"}` parameter counts (shared/tied parameters counted once)."""
    trainable = frozen = 0
    for param in model.parameters():  # parameters() yields each shared parameter once
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def parameter_names(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Names of the parameters under any of `prefixes` (Harmon-relative names)."""
    prefixes = tuple(prefixes)
    return [name for name, _ in model.named_parameters() if _strip_wrappers(name).startswith(prefixes)]


__all__ = [
    "MODULE_GROUPS",
    "count_parameters",
    "parameter_names",
    "resolve_trainable_prefixes",
    "set_trainable_modules",
]
