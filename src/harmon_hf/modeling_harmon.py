"""Harmon for transformers: one model that reads images (image -> text) and draws them (text -> image).

Layout (state-dict keys): `model.language_model` (Qwen2), `model.mar` (MAR encoder/decoder), `model.diffusion_head`,
`model.proj_in`, `model.proj_out`, `model.vae` (diffusers `AutoencoderKL`) and the tied `lm_head`.

- Understanding follows LLaVA: `get_image_features` -> features scattered into the `<image>` placeholders ->
  the LLM; `generate()` is transformers' `GenerationMixin` unchanged.
- Text-to-image is not `generate()` (the image tokens are continuous): `generate_image_tokens` runs the MAR loop
  (prompt KV cache, MAR encoder -> LLM -> MAR decoder -> diffusion head per round) and `decode_image_tokens` turns
  the tokens into pixels. `HarmonPipeline` wraps both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.utils import logging

from .configuration_harmon import HarmonConfig
from .modeling_diffusion_head import HarmonDiffusionHead
from .modeling_mar import HarmonMAR, HarmonMARBlock

logger = logging.get_logger(__name__)

# The id upstream's training data uses for image placeholders (not a vocabulary id); accepted besides `<image>`.
UPSTREAM_IMAGE_PLACEHOLDER_ID = -200


@dataclass
class HarmonModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    """`MultimodalBaseModelOutputWithPast` of the Harmon backbone."""


@dataclass
class HarmonCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    """Output of `HarmonForConditionalGeneration.forward`.

    `loss` is the sum of the task losses that were computed; `loss_i2t` the image-to-text (next-token) loss,
    `loss_t2i` the text-to-image diffusion loss (each `None` when that task was not in the batch).
    """

    loss_i2t: torch.FloatTensor | None = None
    loss_t2i: torch.FloatTensor | None = None


def _mlp_projector(in_dim: int, out_dim: int) -> nn.Sequential:
    # Linear -> SiLU -> Linear; indices 0 and 2 match the upstream checkpoint keys.
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class HarmonPreTrainedModel(PreTrainedModel):
    # Explicit: with `from __future__ import annotations` the `config: HarmonConfig` annotation is a string.
    config_class = HarmonConfig
    config: HarmonConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "HarmonMARBlock", "HarmonDiffusionHead"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The per-batch mean losses must be divided by gradient-accumulation steps as usual: don't let Trainer
    # pass `num_items_in_batch`.
    accepts_loss_kwargs = False
    # The VAE stays float32 under any dtype (it is small and its decoder is sensitive to rounding).
    _keep_in_fp32_modules_strict = ["vae"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        kind = getattr(module, "_upstream_init", None)  # set by `_tag_upstream_init` when the model is built
        if kind == "xavier":
            init.xavier_uniform_(module.weight)
        elif kind == "normal":
            init.normal_(module.weight, std=0.02)
        elif kind == "zeros":
            init.zeros_(module.weight)
        if kind is not None and module.bias is not None:
            init.zeros_(module.bias)
        if isinstance(module, HarmonMAR):
            for param in (
                module.fake_latent,
                module.mask_token,
                module.encoder_pos_embed_learned,
                module.decoder_pos_embed_learned,
                module.diffusion_pos_embed_learned,
            ):
                init.normal_(param, std=self.config.mar_config.initializer_range)


def _tag_upstream_init(mar: HarmonMAR, head: HarmonDiffusionHead) -> None:
    """Mark the linear layers that upstream MAR initialises its own way (what matters when training from scratch;
    loaded weights are never touched): Xavier-uniform weights and zero biases in the MAR and the diffusion head,
    N(0, 0.02) in the head's timestep MLP, and adaLN-zero (the head's blocks start as identities and its output as
    zeros). `HarmonPreTrainedModel._init_weights` reads the mark.

    (On the linear layers themselves, once: transformers skips `_init_weights` on modules without parameters of
    their own, such as the head and its blocks.)
    """
    for part in (mar, head):
        for sub in part.modules():
            if isinstance(sub, nn.Linear):
                sub._upstream_init = "xavier"
    for sub in head.time_embed.mlp:
        if isinstance(sub, nn.Linear):
            sub._upstream_init = "normal"
    for sub in [block.adaLN_modulation[-1] for block in head.res_blocks]:
        sub._upstream_init = "zeros"
    head.final_layer.adaLN_modulation[-1]._upstream_init = "zeros"
    head.final_layer.linear._upstream_init = "zeros"


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` `(B, C, H, W)` with dense channels-last strides `(C*H*W, 1, W*C, C)` (copied unless it has them already).

    oneDNN runs the VAE's convolutions on a CPU 1.1-1.2x faster in float32 and 2.2-2.6x faster in bfloat16 on
    channels-last activations (kl16 widths at 256 px, 2 cores with AMX, 2026-12-05); the results are the same up to
    float rounding. `Tensor.contiguous(memory_format=torch.channels_last)` is not enough for one picture: a
    `(1, C, H, W)` view whose batch stride is not C*H*W counts as channels-last (size-1 dimensions are not checked)
    and is returned as it is, and the convolutions then take their slower plain layout.
    """
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(0) == x.shape[1] * x.shape[2] * x.shape[3]:
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).copy_(x)


class HarmonModel(HarmonPreTrainedModel):
    """Harmon without the language-modelling head: LLM backbone, MAR, diffusion head, projectors and VAE."""

    def __init__(self, config: HarmonConfig):
        super().__init__(config)
        # The MAR is not a PreTrainedModel of its own: give its attention the implementation chosen for the model.
        if config.mar_config._attn_implementation is None:
            config.mar_config._attn_implementation_internal = config._attn_implementation
        hidden = config.text_config.hidden_size
        enc = config.mar_config.encoder_embed_dim
        self.language_model = AutoModel.from_config(config.text_config)
        self.mar = HarmonMAR(config.mar_config)
        self.diffusion_head = HarmonDiffusionHead(config.diffusion_head_config)
        self.proj_in = _mlp_projector(enc, hidden)
        self.proj_out = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, enc))
        self.vae = AutoencoderKL(**config.vae_config.to_autoencoder_kwargs())
        _tag_upstream_init(self.mar, self.diffusion_head)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ----- pixels <-> latent tokens ---------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] `(B, 3, H, W)` -> latent tokens `(B, H/16, W/16, token_dim)` (posterior mean x vae_scale).

        H and W must be multiples of `config.image_stride` (16).
        """
        stride = self.config.image_stride
        if pixel_values.ndim != 4 or pixel_values.shape[-1] % stride or pixel_values.shape[-2] % stride:
            raise ValueError(
                f"pixel_values must be (B, 3, H, W) with H and W multiples of {stride}, got {tuple(pixel_values.shape)}"
            )
        latents = self.vae.encode(self._vae_input(pixel_values)).latent_dist.mode() * self.config.vae_scale
        return self._patchify(latents)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latent tokens `(B, m, n, token_dim)` -> images `(B, 3, 16m, 16n)` in about [-1, 1] (not clamped)."""
        return self.vae.decode(self._vae_input(self._unpatchify(tokens) / self.config.vae_scale)).sample

    def _vae_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `(B, C, H, W)` in the VAE's dtype, on a CPU in dense channels-last strides (see `channels_last`)."""
        x = x.to(self.vae.dtype)
        return channels_last(x) if x.device.type == "cpu" else x

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H/p, W/p, C*p*p) with channel order (c, p, q).
        p = self.config.mar_config.patch_size
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, h // p, w // p, c * p * p)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.config.mar_config.patch_size
        b, m, n, d = tokens.shape
        c = d // (p * p)
        x = tokens.reshape(b, m, n, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, m * p, n * p)

    # ----- visual features ------------------------------------------------------------------------------------
    def project_visual(self, x_enc: torch.Tensor) -> torch.Tensor:
        """MAR encoder output `(B, buffer + K, enc)` -> LLM inputs `(B, K + buffer, hidden)`: proj_in, buffer moved last."""
        z = self.proj_in(x_enc)
        buffer = self.config.buffer_size
        return torch.cat([z[:, buffer:], z[:, :buffer]], dim=1)

    def visual_residual(self, llm_hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden states of the image rows `(B, K + buffer, hidden)` -> `(B, buffer + K, enc)`: buffer back first,
        then proj_out (added to the MAR encoder output)."""
        buffer = self.config.buffer_size
        h = torch.cat([llm_hidden[:, -buffer:], llm_hidden[:, :-buffer]], dim=1)
        return self.proj_out(h)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Understanding features of images (`GenerationMixin` calls this once before prefill, with `return_dict`).

        Args:
            pixel_values: `(B, 3, H, W)` in [-1, 1] (see `HarmonImageProcessor`), or
            image_tokens: precomputed latent tokens `(B, m, n, token_dim)`.
        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` = MAR encoder output `(B, buffer + L, enc)` (buffer
            first) and `pooler_output` = features for the LLM `(B, L + buffer, hidden)` (buffer LAST), which replace the
            `L + buffer` `<image>` placeholders of each image in order.
        """
        if (pixel_values is None) == (image_tokens is None):
            raise ValueError("Pass exactly one of pixel_values or image_tokens.")
        if image_tokens is None:
            image_tokens = self.encode_images(pixel_values)
        b, m, n, d = image_tokens.shape
        x_enc = self.mar.encode(image_tokens.reshape(b, m * n, d).to(self.mar.z_proj.weight.dtype), (m, n))
        return BaseModelOutputWithPooling(last_hidden_state=x_enc, pooler_output=self.project_visual(x_enc))

    def is_image_placeholder(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of the image placeholders in `input_ids`: the `<image>` id, or upstream's training id -200."""
        return (input_ids == self.config.image_token_id) | (input_ids == UPSTREAM_IMAGE_PLACEHOLDER_ID)

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, n_features: int):
        """`(B, S, 1)` bool mask of the `<image>` positions; checks that their count equals the number of features."""
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = self.is_image_placeholder(input_ids)
        n_tokens = int(mask.sum())
        if n_tokens != n_features:
            raise ValueError(
                f"The prompt has {n_tokens} <image> placeholder tokens but the images give {n_features} feature vectors "
                f"({self.config.num_image_tokens()} per {self.config.image_size}px image); use HarmonProcessor to expand "
                "each <image> for the image size used."
            )
        return mask.unsqueeze(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        image_grad_scale: float | None = None,
        image_tokens: torch.Tensor | None = None,
        **kwargs,
    ) -> HarmonModelOutputWithPast:
        """LLM forward with image features merged into the `<image>` placeholders.

        `input_ids` `(B, S)`, `pixel_values` `(N_images, 3, H, W)` or their VAE latent tokens `image_tokens`
        `(N_images, m, n, token_dim)` (a training latent cache); `image_grad_scale` scales the gradient that flows
        into the image features (values unchanged).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        given = [
            name
            for name, value in (
                ("pixel_values", pixel_values),
                ("image_tokens", image_tokens),
                ("mm_encoder_outputs", mm_encoder_outputs),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"Pass at most one of pixel_values, image_tokens and mm_encoder_outputs, got {given}")
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if mm_encoder_outputs.get("image") is None and (pixel_values is not None or image_tokens is not None):
            mm_encoder_outputs["image"] = self.get_image_features(pixel_values=pixel_values, image_tokens=image_tokens)
        image_outputs = mm_encoder_outputs.get("image")
        if inputs_embeds is None:
            embed_ids = input_ids
            if image_outputs is not None:
                # Placeholders may carry ids outside the vocabulary (upstream training uses -200): embed a valid id.
                embed_ids = torch.where(self.is_image_placeholder(input_ids), 0, input_ids)
            elif (cache is None or cache.get_seq_length() == 0) and bool(self.is_image_placeholder(input_ids).any()):
                # A first forward (no cache yet) whose prompt holds placeholders but no images: the image would be
                # silently replaced by the <image> embedding. (Later decoding steps may generate the id; fine.)
                n = int(self.is_image_placeholder(input_ids).sum())
                raise ValueError(
                    f"input_ids hold {n} <image> placeholder tokens but no pixel_values (or image features) were "
                    "given; pass the images the prompt refers to (HarmonProcessor(text=..., images=...))"
                )
            inputs_embeds = self.get_input_embeddings()(embed_ids)

        if image_outputs is not None:
            features = image_outputs.pooler_output
            features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.device, inputs_embeds.dtype)
            if image_grad_scale is not None and image_grad_scale != 1.0 and torch.is_grad_enabled():
                features = features * image_grad_scale + features.detach() * (1.0 - image_grad_scale)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, features.shape[0])
            inputs_embeds = inputs_embeds.masked_scatter(mask, features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return HarmonModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )

    # ----- one MAR round: encoder -> LLM -> decoder -------------------------------------------------------------
    def mar_llm_step(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None,
        size: tuple[int, int],
        prompt_attention_mask: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        num_shared_rows: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """MAR encoder -> proj_in -> LLM (after the prompt) -> proj_out residual -> MAR decoder.

        Args:
            tokens: `(R, L, token_dim)` current latent tokens (unknown slots hold anything; they are dropped).
            mask: `(R, L)`, 1 = unknown; None = nothing masked.
            size: token grid `(m, n)`.
            prompt_attention_mask: `(R, S)` mask of the right-padded prompts.
            prompt_embeds: `(R, S, hidden)` prompt embeddings (training: the LLM runs on prompt + image rows), or
            cache: a KV cache already filled with the `S` prompt positions (sampling); it is cropped back afterwards.
            num_shared_rows: if the rows `[k:]` repeat the tokens/mask of rows `[:k]` (classifier-free guidance), the
                MAR encoder and proj_in run on the first `k` rows only and are shared (identical results).
        Returns:
            dict with `x_enc` `(R, buffer + K, enc)` (MAR encoder output), `z_enc` `(R, K + buffer, hidden)`,
            `position_ids` `(R, K + buffer)`, `llm_hidden` `(R, K + buffer, hidden)`, `x_enc_residual` (x_enc plus
            the LLM residual) and `z` `(R, L, dec)` conditions of the diffusion head.
        """
        rows = tokens.shape[0]
        enc_rows = num_shared_rows if num_shared_rows else rows
        x_enc = self.mar.encode(tokens[:enc_rows], size, None if mask is None else mask[:enc_rows])
        z_enc = self.project_visual(x_enc)
        if enc_rows != rows:
            repeat = rows // enc_rows
            x_enc = x_enc.repeat(repeat, 1, 1)
            z_enc = z_enc.repeat(repeat, 1, 1)
        n_image = z_enc.shape[1]
        ones = torch.ones(rows, n_image, dtype=prompt_attention_mask.dtype, device=prompt_attention_mask.device)
        full_mask = torch.cat([prompt_attention_mask, ones], dim=1)
        # Image rows continue from each prompt's TRUE length (cumsum of the mask), not from the padded length.
        full_positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        llm_dtype = self.get_input_embeddings().weight.dtype
        if cache is None:
            if prompt_embeds is None:
                raise ValueError("mar_llm_step needs prompt_embeds or a prompt cache")
            out = self.language_model(
                inputs_embeds=torch.cat([prompt_embeds, z_enc.to(llm_dtype)], dim=1),
                attention_mask=full_mask,
                position_ids=full_positions,
                use_cache=False,
            )
            llm_hidden = out.last_hidden_state[:, -n_image:]
        else:
            out = self.language_model(
                inputs_embeds=z_enc.to(llm_dtype),
                attention_mask=full_mask,
                position_ids=full_positions[:, -n_image:],
                cache=cache,
                use_cache=True,
            )
            cache.crop(-n_image)
            llm_hidden = out.last_hidden_state
        x_res = x_enc + self.visual_residual(llm_hidden.to(x_enc.dtype))
        z = self.mar.decode(x_res, size, mask)
        return {
            "x_enc": x_enc,
            "z_enc": z_enc,
            "position_ids": full_positions,
            "llm_hidden": llm_hidden,
            "x_enc_residual": x_res,
            "z": z,
        }

    def prefill_prompts(self, input_ids: torch.Tensor) -> DynamicCache:
        """Run right-padded prompts `(R, S)` once through the LLM (no mask, positions 0..S-1) and return the cache.

        Causal attention keeps the right padding from reaching the real tokens; later image rows mask it out.
        """
        cache = DynamicCache(config=self.config.text_config)
        self.language_model(input_ids=input_ids, cache=cache, use_cache=True)
        return cache


def _gather_rows(generators: Sequence[torch.Generator | None], rows: Sequence[int], shape_tail, device, dtype):
    """Draw `(sum(rows), *shape_tail)` normal noise, the j-th block of `rows[j]` rows from `generators[j]`."""
    parts = [
        torch.randn((r, *shape_tail), generator=g, device=g.device if g is not None else device, dtype=dtype)
        for g, r in zip(generators, rows)
        if r > 0
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # called at every head step: no needless copy
    return out if out.device == device else out.to(device)


class HarmonForConditionalGeneration(HarmonPreTrainedModel, GenerationMixin):
    """Harmon with the language-modelling head: `forward` (understanding + both training losses), `generate` (text),
    `generate_image_tokens` / `decode_image_tokens` (text-to-image)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: HarmonConfig):
        super().__init__(config)
        self.model = HarmonModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._train_scheduler = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values=None, image_tokens=None, **kwargs) -> BaseModelOutputWithPooling:
        """See `HarmonModel.get_image_features`."""
        return self.model.get_image_features(pixel_values=pixel_values, image_tokens=image_tokens)

    @apply_forward_hook
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """See `HarmonModel.encode_images`: pixels `(B, 3, H, W)` -> tokens `(B, H/16, W/16, token_dim)`."""
        return self.model.encode_images(pixel_values)

    @apply_forward_hook
    def decode_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """See `HarmonModel.decode_tokens`: tokens `(B, m, n, token_dim)` -> images `(B, 3, 16m, 16n)`."""
        return self.model.decode_tokens(tokens)

    # ----- forward: understanding logits + losses ---------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        generation_input_ids: torch.LongTensor | None = None,
        generation_attention_mask: torch.Tensor | None = None,
        generation_pixel_values: torch.Tensor | None = None,
        generation_image_tokens: torch.Tensor | None = None,
        generation_orders: torch.LongTensor | None = None,
        generation_mask: torch.Tensor | None = None,
        diffusion_timesteps: torch.LongTensor | None = None,
        diffusion_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        image_tokens: torch.Tensor | None = None,
        **kwargs,
    ) -> HarmonCausalLMOutputWithPast:
        """Understanding forward (LLaVA-style) and/or the text-to-image training loss.

        Understanding part (all optional when only generation inputs are given): `input_ids` `(B, S)` with expanded
        `<image>` placeholders, `pixel_values` `(N_images, 3, H, W)` (or their latent tokens `image_tokens`
        `(N_images, m, n, C)`), `attention_mask`, `labels` `(B, S)` (-100 = ignored) -> `logits` and `loss_i2t`
        (token-mean next-token cross-entropy; the gradient into the image features is scaled by
        `config.grad_scale_image2text`).

        Text-to-image part: `generation_input_ids` / `generation_attention_mask` `(B', S')` right-padded prompts and
        `generation_pixel_values` `(B', 3, H, W)` (or `generation_image_tokens` `(B', m, n, C)`) -> `loss_t2i`. Its
        random choices can be injected: `generation_orders` `(B', L)` permutations or `generation_mask` `(B', L)`
        (1 = masked), `diffusion_timesteps` `(diffusion_batch_mul * B' * L,)`, `diffusion_noise` (same rows, C); what
        is not given is drawn from `generator`.

        `loss` = sum of the computed task losses.
        """
        logits = None
        loss_i2t = None
        outputs = None
        if input_ids is not None or inputs_embeds is not None:
            outputs = self.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                mm_encoder_outputs=mm_encoder_outputs,
                image_grad_scale=self.config.grad_scale_image2text if labels is not None else None,
                image_tokens=image_tokens,
                **kwargs,
            )
            hidden = outputs.last_hidden_state
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep]
            logits = self.lm_head(hidden)
            if labels is not None:
                loss_i2t = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size
                )

        loss_t2i = None
        if generation_pixel_values is not None or generation_image_tokens is not None:
            loss_t2i = self.text_to_image_loss(
                input_ids=generation_input_ids,
                attention_mask=generation_attention_mask,
                pixel_values=generation_pixel_values,
                image_tokens=generation_image_tokens,
                orders=generation_orders,
                mask=generation_mask,
                timesteps=diffusion_timesteps,
                noise=diffusion_noise,
                generator=generator,
            )["loss"]
        elif generation_input_ids is not None:
            raise ValueError("generation_input_ids were given without generation_pixel_values/generation_image_tokens")

        losses = [x for x in (loss_i2t, loss_t2i) if x is not None]
        return HarmonCausalLMOutputWithPast(
            loss=sum(losses) if losses else None,
            logits=logits,
            cache=outputs.cache if outputs is not None else None,
            hidden_states=outputs.hidden_states if outputs is not None else None,
            attentions=outputs.attentions if outputs is not None else None,
            image_outputs=outputs.image_outputs if outputs is not None else None,
            loss_i2t=loss_i2t,
            loss_t2i=loss_t2i,
        )

    # ----- text-to-image training loss ---------------------------------------------------------------------------
    @property
    def train_scheduler(self):
        """The 1000-step diffusion process of the head (training loss tables), built from the config."""
        if self._train_scheduler is None:
            from .scheduling_harmon import HarmonDDPMScheduler

            cfg = self.config.diffusion_head_config
            self._train_scheduler = HarmonDDPMScheduler(num_train_timesteps=cfg.num_train_timesteps)
        return self._train_scheduler

    def sample_training_mask(
        self, batch: int, length: int, generator: torch.Generator | None = None, orders: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Upstream's training mask `(B, L)` (1 = masked): a random order per row and a mask ratio drawn from a
        normal centred at 1.0 (std `mask_ratio_std`) truncated to [`mask_ratio_min`, 1] (always 1 when
        `mask_ratio_min` is 1); the first ceil(L * ratio) entries of each order are masked."""
        device = self.device
        if orders is None:
            orders = torch.stack([torch.randperm(length, generator=generator) for _ in range(batch)]).to(device)
        cfg = self.config.mar_config
        low = (cfg.mask_ratio_min - 1.0) / cfg.mask_ratio_std
        ratio = 1.0
        while low < 0.0:  # rejection sampling of the truncated normal (acceptance ~ 0.38 with the defaults)
            z = torch.randn((), generator=generator).item()
            if low <= z <= 0.0:
                ratio = 1.0 + cfg.mask_ratio_std * z
                break
        num_masked = int(math.ceil(length * ratio))
        mask = torch.zeros(batch, length, device=device)
        mask.scatter_(1, orders[:, :num_masked].to(device), 1.0)
        return mask

    def text_to_image_loss(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        orders: torch.LongTensor | None = None,
        mask: torch.Tensor | None = None,
        timesteps: torch.LongTensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The text-to-image diffusion loss of upstream Harmon, with every random choice injectable.

        Returns a dict with `loss` (scalar) and the intermediates (`latents`, `mask`, `x_enc`, `z_enc`,
        `llm_hidden`, `z`, `target`, `cond`, `diffusion_mask`, `timesteps`, `noise`, `x_t`, `loss_mse`, `loss_vb`).
        """
        if input_ids is None or attention_mask is None:
            raise ValueError("the text-to-image loss needs generation_input_ids and generation_attention_mask")
        if image_tokens is None:
            with torch.no_grad():  # the VAE is frozen in every Harmon stage
                image_tokens = self.model.encode_images(pixel_values)
        b, m, n, c = image_tokens.shape
        length = m * n
        dtype = self.model.mar.z_proj.weight.dtype
        latents = image_tokens.reshape(b, length, c).to(dtype)
        if mask is None:
            mask = self.sample_training_mask(b, length, generator=generator, orders=orders)
        mask = mask.to(latents.device, dtype)
        prompt_embeds = self.get_input_embeddings()(input_ids)
        step = self.model.mar_llm_step(latents, mask, (m, n), attention_mask, prompt_embeds=prompt_embeds)
        z = step["z"]

        mul = self.config.diffusion_head_config.diffusion_batch_mul
        target = latents.reshape(b * length, c).repeat(mul, 1)
        cond = z.reshape(b * length, -1).repeat(mul, 1)
        diffusion_mask = mask.reshape(b * length).repeat(mul)
        scheduler = self.train_scheduler
        rows = target.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (rows,), generator=generator)
        timesteps = timesteps.to(target.device)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, dtype=torch.float32).to(target.device, dtype)
        x_t = scheduler.add_noise(target, noise, timesteps)
        model_output = self.model.diffusion_head(x_t, timesteps, cond)
        loss_mse, loss_vb = scheduler.training_loss_terms(model_output, target, x_t, timesteps, noise)
        gamma = self.config.diffusion_head_config.snr_gamma
        if gamma is None:
            terms = loss_mse + loss_vb
        else:
            terms = loss_mse * self.min_snr_weights(timesteps, gamma).to(loss_mse) + loss_vb
        loss = (terms * diffusion_mask).sum() / diffusion_mask.sum()
        loss_x0 = None
        readout_weight = self.config.diffusion_head_config.x0_readout_weight
        if readout_weight:
            # the condition's own read-out of the clean token, on the masked tokens (no diffusion noise involved)
            flat_mask = mask.reshape(b * length)
            x0_error = self.model.diffusion_head.x0_readout(z.reshape(b * length, -1)) - latents.reshape(b * length, c)
            loss_x0 = (x0_error.float().pow(2).mean(-1) * flat_mask).sum() / flat_mask.sum()
            loss = loss + readout_weight * loss_x0
        return dict(
            step,
            loss=loss,
            loss_x0=loss_x0,
            latents=latents,
            mask=mask,
            target=target,
            cond=cond,
            diffusion_mask=diffusion_mask,
            timesteps=timesteps,
            noise=noise,
            x_t=x_t,
            loss_mse=loss_mse,
            loss_vb=loss_vb,
        )

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights of noise-prediction rows: min(SNR(t), gamma) / SNR(t), SNR = a_t / (1 - a_t) with
        a_t the training process's `alphas_cumprod`. `timesteps` `(N,)` -> `(N,)` float64, in (0, 1]."""
        alphas = self.train_scheduler.train_tables.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1.0 - alphas)
        return snr.clamp(max=gamma) / snr

    # ----- text-to-image sampling --------------------------------------------------------------------------------
    @staticmethod
    def mask_schedule(length: int, num_iter: int) -> list[int]:
        """Tokens still masked after each MAR round: floor(L * cos(pi/2 * (s+1)/num_iter)) clamped to
        [1, masked - 1] (the last round predicts everything left, so its entry is 0)."""
        masked, schedule = length, []
        for s in range(num_iter):
            if s == num_iter - 1:
                schedule.append(0)
                break
            target = math.floor(length * math.cos(math.pi / 2.0 * (s + 1) / num_iter))
            masked = max(1, min(masked - 1, target))
            schedule.append(masked)
        return schedule

    @torch.no_grad()
    @apply_forward_hook
    def generate_image_tokens(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        size: tuple[int, int],
        num_iter: int = 64,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        scheduler=None,
        num_diffusion_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        orders: torch.LongTensor | None = None,
        init_noise: Sequence[torch.Tensor] | None = None,
        step_noise: Sequence[torch.Tensor] | None = None,
        callback: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None,
        return_intermediates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The MAR generation loop (upstream `Harmon.sample`).

        Args:
            input_ids: `(R, S)` right-padded prompt ids. With `guidance_scale != 1` the rows are `[P conditional
                prompts; P unconditional prompts]` (R = 2P), else R = P.
            attention_mask: `(R, S)`.
            size: token grid `(m, n)` (pixels / 16).
            num_iter: MAR rounds; at most m*n (more would leave rounds with nothing to predict; clamped with a warning).
            guidance_scale: CFG scale on the head's eps. `guidance_schedule` "constant" or "linear" (grows from 1 with
                the fraction of tokens already drawn).
            temperature: multiplies the head's sampling noise (0 = deterministic given the initial noise).
            scheduler: the head's scheduler (default: a `HarmonDDPMScheduler` with 100 steps).
            num_diffusion_steps: head steps per round (default: the scheduler's `num_inference_steps`).
            generator: one `torch.Generator`, or a list of P (one per image): image i then draws its order and all its
                noise from generator i alone, so a batch gives the same images as its prompts one by one.
            orders: injected generation orders `(P, L)` (or `(R, L)`; with CFG rows `[P:]` are replaced by `[:P]`).
            init_noise / step_noise: injected head noise per MAR round: `init_noise[s]` `(N_s', C)` (N_s' = predicted
                rows of the conditional half with CFG, all rows without), `step_noise[s]` `(steps, N_s, C)` in
                consumption order (see `scheduling_harmon.sample_tokens`).
            callback: called after each round with `(round, {"tokens": (P, L, C), "mask": (P, L)})`; it may return a
                dict whose `"tokens"` replace the current tokens (the mask, which drives the schedule, cannot change).
        Returns:
            tokens `(P, m, n, C)` of the conditional rows (and the per-round intermediates if asked).
        """
        from .scheduling_harmon import HarmonDDPMScheduler, sample_tokens

        use_cfg = guidance_scale != 1.0
        rows = input_ids.shape[0]
        if use_cfg and rows % 2:
            raise ValueError(f"with guidance_scale != 1 the prompt rows must be [cond; uncond] (even), got {rows}")
        if guidance_schedule not in ("constant", "linear"):
            raise ValueError(f"guidance_schedule must be 'constant' or 'linear', got {guidance_schedule!r}")
        n_img = rows // 2 if use_cfg else rows
        m, n = size
        length = m * n
        c = self.config.mar_config.token_dim
        if num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {num_iter}")
        if num_iter > length:
            logger.warning(f"num_iter={num_iter} exceeds the {length} tokens of a {m}x{n} grid; using {length} rounds.")
            num_iter = length
        device = self.device
        dtype = self.model.mar.z_proj.weight.dtype
        if scheduler is None:
            scheduler = HarmonDDPMScheduler()
        generators = generator if isinstance(generator, list) else [generator] * n_img
        if len(generators) != n_img:
            raise ValueError(f"got {len(generators)} generators for {n_img} images")

        if orders is None:
            orders = torch.stack(
                [torch.randperm(length, generator=g, device=g.device if g is not None else "cpu") for g in generators]
            )
        orders = orders[:n_img].to(device)
        cache = self.model.prefill_prompts(input_ids.to(device))
        attention_mask = attention_mask.to(device)

        tokens = torch.zeros(n_img, length, c, device=device, dtype=dtype)
        mask = torch.ones(n_img, length, device=device, dtype=dtype)
        schedule = self.mask_schedule(length, num_iter)
        intermediates = []
        for s in range(num_iter):
            rep = 2 if use_cfg else 1
            step = self.model.mar_llm_step(
                tokens.repeat(rep, 1, 1),
                mask.repeat(rep, 1),
                size,
                attention_mask,
                cache=cache,
                num_shared_rows=n_img if use_cfg else None,
            )
            mask_len = schedule[s]
            next_mask = torch.zeros_like(mask)
            if mask_len > 0:
                next_mask.scatter_(1, orders[:, :mask_len], 1.0)
            to_pred = mask.bool() & ~next_mask.bool()
            counts = to_pred.sum(1).tolist()
            to_pred_rows = to_pred.repeat(rep, 1)
            cond = step["z"][to_pred_rows]
            if guidance_schedule == "linear":
                # upstream's mask_len is clamped to >= 1 even in the last round (which then predicts everything left)
                scale = 1.0 + (guidance_scale - 1.0) * (length - max(mask_len, 1)) / length
            else:
                scale = guidance_scale
            if init_noise is not None:
                x0_noise = init_noise[s].to(device, torch.float32)
            else:
                x0_noise = _gather_rows(generators, counts, (c,), device, torch.float32)
            if step_noise is not None:
                noise_fn = step_noise[s]
            elif temperature == 0:
                noise_fn = None
            else:

                def noise_fn(j, _counts=counts):
                    half = _gather_rows(generators, _counts, (c,), device, torch.float32)
                    return torch.cat([half, torch.zeros_like(half)]) if use_cfg and return_intermediates else half

            sampled = sample_tokens(
                self.model.diffusion_head,
                cond,
                scheduler,
                num_inference_steps=num_diffusion_steps,
                guidance_scale=scale,
                temperature=temperature,
                init_noise=x0_noise,
                step_noise=noise_fn,
                # only the conditional rows are kept: skip the unconditional half's scheduler steps (identical
                # tokens); the intermediates keep upstream's full rows
                conditional_only=not return_intermediates,
            )
            new_tokens = tokens.clone()
            new_tokens[to_pred] = sampled[: int(sum(counts))].to(dtype)
            if return_intermediates:
                intermediates.append(
                    dict(mask=mask.clone(), mask_to_pred=to_pred, cond_z=cond, sampled=sampled, scale=scale, **step)
                )
            tokens, mask = new_tokens, next_mask
            if callback is not None:
                replaced = callback(s, {"tokens": tokens, "mask": mask})
                tokens = self._callback_tokens(replaced, tokens, mask)
        tokens = tokens.reshape(n_img, m, n, c)
        return (tokens, intermediates) if return_intermediates else tokens

    @staticmethod
    def _callback_tokens(
        replaced: dict[str, torch.Tensor] | None, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The tokens after a round callback returned `replaced` (None or a dict; see `generate_image_tokens`)."""
        if replaced is None:
            return tokens
        if not isinstance(replaced, dict):
            raise ValueError(f"a round callback must return None or a dict, got {type(replaced).__name__}")
        new_mask = replaced.get("mask")
        if new_mask is not None and new_mask is not mask and not torch.equal(new_mask.to(mask), mask):
            raise ValueError("a round callback cannot change the mask: it drives the generation schedule")
        new_tokens = replaced.get("tokens")
        if new_tokens is None:
            return tokens
        if tuple(new_tokens.shape) != tuple(tokens.shape):
            raise ValueError(
                f"tokens returned by a round callback must have shape {tuple(tokens.shape)}, "
                f"got {tuple(new_tokens.shape)}"
            )
        return new_tokens.to(tokens)


__all__ = ["HarmonForConditionalGeneration", "HarmonModel", "HarmonPreTrainedModel", "HarmonMARBlock"]
