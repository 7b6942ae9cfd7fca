"""Configuration classes for Harmon.

`HarmonConfig` is a composite config (like `LlavaConfig` / `JanusConfig`): the Qwen2 text config plus three
Harmon-specific sub-configs, one per model part:

- `HarmonMARConfig`: the MAR ViT encoder/decoder that turns VAE latent tokens into visual features and back
  into per-token diffusion conditions.
- `HarmonDiffusionHeadConfig`: the small MLP-with-adaLN head that denoises one latent token at a time.
- `HarmonVAEConfig`: the kl16 KL autoencoder; its fields are exactly the keyword arguments of diffusers'
  `AutoencoderKL`, which expresses the upstream layout exactly.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


@strict
class HarmonMARConfig(PreTrainedConfig):
    r"""
    The MAR encoder/decoder of Harmon (timm-style pre-norm ViT blocks with a fused `qkv`).

    Args:
        token_dim (`int`, defaults to 16): channels of one latent token (the VAE's latent channels x patch^2).
        patch_size (`int`, defaults to 1): latent patch size (Harmon uses 1: one token per latent pixel).
        grid_size (`int`, defaults to 16): side of the token grid the position tables were trained for
            (256 px / VAE stride 16). Other grids resize the image part of the tables bilinearly.
        buffer_size (`int`, defaults to 64): number of "buffer" slots prepended to the image tokens.
        encoder_embed_dim / encoder_depth / encoder_num_heads: width, number of blocks and heads of the encoder.
        decoder_embed_dim / decoder_depth / decoder_num_heads: the same for the decoder.
        mlp_ratio (`float`, defaults to 4.0): hidden width of the block MLPs relative to the block width.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm.
        attention_dropout / projection_dropout (`float`, defaults to 0.1): dropout used in training only.
        mask_ratio_min (`float`, defaults to 0.7): lower bound of the training mask ratio (a normal centred at 1.0
            truncated to [mask_ratio_min, 1]), in [0, 1]; 1.0 masks every token in every training step.
        mask_ratio_std (`float`, defaults to 0.25): standard deviation of that normal, > 0.
    """

    model_type = "harmon_mar"
    base_config_key = "mar_config"

    token_dim: int = 16
    patch_size: int = 1
    grid_size: int = 16
    buffer_size: int = 64
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float | int = 4.0
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.1
    projection_dropout: float | int = 0.1
    mask_ratio_min: float = 0.7
    mask_ratio_std: float = 0.25
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if dim % heads != 0:
                raise ValueError(f"{name}_embed_dim ({dim}) must be divisible by {name}_num_heads ({heads}).")
        if not 0.0 <= self.mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in [0, 1], got {self.mask_ratio_min}")
        if not 0.0 < self.mask_ratio_std < float("inf"):
            raise ValueError(f"mask_ratio_std must be a finite number > 0, got {self.mask_ratio_std}")

    @property
    def seq_len(self) -> int:
        """Number of image tokens of the trained grid (grid_size^2)."""
        return self.grid_size * self.grid_size


@strict
class HarmonDiffusionHeadConfig(PreTrainedConfig):
    r"""
    The per-token diffusion head (an MLP with adaLN conditioning) and its Gaussian diffusion process.

    Args:
        in_channels (`int`, defaults to 16): channels of one latent token.
        model_channels (`int`, defaults to 1024): width of the residual MLP blocks.
        num_res_blocks (`int`, defaults to 6): number of residual blocks.
        cond_channels (`int`, defaults to 768): width of the condition vectors (the MAR decoder width).
        frequency_embedding_size (`int`, defaults to 256): size of the sinusoidal timestep features.
        learn_sigma (`bool`, defaults to True): the head also outputs a learned-range variance value per channel.
        num_train_timesteps (`int`, defaults to 1000): steps of the training diffusion process.
        beta_schedule (`str`, defaults to "squaredcos_cap_v2"): the cosine schedule (diffusers' name).
        diffusion_batch_mul (`int`, defaults to 4): each token is repeated this many times in the training loss,
            each copy with its own timestep and noise.
        snr_gamma (`float`, *optional*): Min-SNR loss weighting (Hang et al. 2023, diffusers' `--snr_gamma`): the
            noise-prediction MSE of a row at timestep t is weighted by min(SNR(t), snr_gamma) / SNR(t), which
            lowers the weight of the nearly clean timesteps where the condition hardly matters. None (upstream):
            every row weighs 1. Training only; sampling does not read it.
        x0_readout_weight (`float`, *optional*): weight of an auxiliary text-to-image loss on the head's
            conditions: a linear read-out (`HarmonDiffusionHead.x0_readout`, built only when this is set) predicts
            each masked token's clean latent from its condition `z`, and its mean squared error, times this weight,
            is added to the diffusion loss. The read-out's error has no diffusion noise in it, so it gives the MAR and
            the LLM a direct signal of which token belongs where. None (upstream): no read-out, no extra term.
            Training only; sampling does not use the read-out.
    """

    model_type = "harmon_diffusion_head"
    base_config_key = "diffusion_head_config"

    in_channels: int = 16
    model_channels: int = 1024
    num_res_blocks: int = 6
    cond_channels: int = 768
    frequency_embedding_size: int = 256
    learn_sigma: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    diffusion_batch_mul: int = 4
    initializer_range: float = 0.02
    snr_gamma: float | None = None
    x0_readout_weight: float | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("snr_gamma", "x0_readout_weight"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf")
            ):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if self.beta_schedule != "squaredcos_cap_v2":
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; Harmon uses 'squaredcos_cap_v2'.")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


@strict
class HarmonVAEConfig(PreTrainedConfig):
    r"""
    The kl16 KL autoencoder. Every field is a keyword argument of diffusers' `AutoencoderKL` with the same name,
    so `AutoencoderKL(**config.to_autoencoder_kwargs())` builds it. Defaults are the real kl16 (66.5 M parameters).
    """

    model_type = "harmon_vae"
    base_config_key = "vae_config"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list[str] | tuple[str, ...] = (
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
    )
    up_block_types: list[str] | tuple[str, ...] = ("UpDecoderBlock2D",) * 5
    block_out_channels: list[int] | tuple[int, ...] = (128, 128, 256, 256, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 16
    norm_num_groups: int = 32
    sample_size: int = 256
    scaling_factor: float = 0.2325
    force_upcast: bool = False
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.down_block_types = list(self.down_block_types)
        self.up_block_types = list(self.up_block_types)
        self.block_out_channels = list(self.block_out_channels)
        for c in self.block_out_channels:
            if c % self.norm_num_groups != 0:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups "
                    f"({self.norm_num_groups})."
                )

    _AUTOENCODER_KEYS = (
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "sample_size",
        "scaling_factor",
        "force_upcast",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    )

    def to_autoencoder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.AutoencoderKL`."""
        return {k: getattr(self, k) for k in self._AUTOENCODER_KEYS}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@strict
class HarmonConfig(PreTrainedConfig):
    r"""
    Configuration of a Harmon model (`HarmonForConditionalGeneration`).

    Args:
        text_config (`dict` or `PreTrainedConfig`): the LLM config (a Qwen2 config for the released models).
        mar_config (`dict` or `HarmonMARConfig`): the MAR encoder/decoder.
        diffusion_head_config (`dict` or `HarmonDiffusionHeadConfig`): the diffusion head.
        vae_config (`dict` or `HarmonVAEConfig`): the VAE.
        image_token_id (`int`, defaults to 151665): vocabulary id of the `<image>` placeholder token.
        vae_scale (`float`, defaults to 0.2325): latents are multiplied by this after encoding, divided before decoding.
        image_size (`int`, defaults to 256): the image resolution the MAR position tables were trained for.
        grad_scale_image2text (`float`, defaults to 0.1): factor on the gradient flowing from the image-to-text loss
            into the visual features (the forward values are unchanged).
        tie_word_embeddings (`bool`): copied from the text config.

    Example:

    ```python
    >>> from harmon_hf import HarmonConfig
    >>> config = HarmonConfig.harmon_0_5b()
    >>> config.mar_config.encoder_embed_dim
    768
    ```
    """

    model_type = "harmon"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "mar_config": HarmonMARConfig,
        "diffusion_head_config": HarmonDiffusionHeadConfig,
        "vae_config": HarmonVAEConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    mar_config: dict | HarmonMARConfig | None = None
    diffusion_head_config: dict | HarmonDiffusionHeadConfig | None = None
    vae_config: dict | HarmonVAEConfig | None = None
    image_token_id: int = 151665
    vae_scale: float = 0.2325
    image_size: int = 256
    grad_scale_image2text: float = 0.1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.diffusion_head_config.cond_channels != self.mar_config.decoder_embed_dim:
            raise ValueError(
                f"diffusion_head_config.cond_channels ({self.diffusion_head_config.cond_channels}) must equal "
                f"mar_config.decoder_embed_dim ({self.mar_config.decoder_embed_dim})."
            )
        if self.diffusion_head_config.in_channels != self.mar_config.token_dim:
            raise ValueError(
                f"diffusion_head_config.in_channels ({self.diffusion_head_config.in_channels}) must equal "
                f"mar_config.token_dim ({self.mar_config.token_dim})."
            )
        if self.vae_config.latent_channels * self.mar_config.patch_size**2 != self.mar_config.token_dim:
            raise ValueError(
                f"vae_config.latent_channels ({self.vae_config.latent_channels}) x patch_size^2 must equal "
                f"mar_config.token_dim ({self.mar_config.token_dim})."
            )

    @property
    def buffer_size(self) -> int:
        """Number of MAR buffer slots (the image features hold `num_image_tokens + buffer_size` vectors)."""
        return self.mar_config.buffer_size

    @property
    def image_stride(self) -> int:
        """Pixels per latent token side (VAE downsampling x MAR patch size; 16 for Harmon)."""
        return self.vae_config.downsample_factor * self.mar_config.patch_size

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Number of `<image>` placeholders for an image of `height` x `width` pixels (default `image_size`)."""
        height = self.image_size if height is None else height
        width = height if width is None else width
        return (height // self.image_stride) * (width // self.image_stride) + self.buffer_size

    # ----- presets -------------------------------------------------------------------------------------------
    @classmethod
    def harmon_0_5b(cls, **kwargs) -> HarmonConfig:
        """Harmon-0.5B: Qwen2.5-0.5B-Instruct + MAR-Base (768, 12+12 blocks, 12 heads) + head 6 x 1024."""
        return cls._preset(_QWEN25_0_5B, mar=(768, 12, 12), head=(6, 1024), **kwargs)

    @classmethod
    def harmon_1_5b(cls, **kwargs) -> HarmonConfig:
        """Harmon-1.5B (and 1.5B-o): Qwen2.5-1.5B-Instruct + MAR-Huge (1280, 20+20, 16 heads) + head 12 x 1536."""
        return cls._preset(_QWEN25_1_5B, mar=(1280, 20, 16), head=(12, 1536), **kwargs)

    @classmethod
    def tiny(cls, **kwargs) -> HarmonConfig:
        """A tiny random-weight layout for tests (the shapes of the upstream-tiny fixture): 64 px images (4x4 tokens),
        LLM 64 wide x 2 layers with a 512-entry vocabulary, MAR 32 wide 2+2 blocks, 8 buffer slots, head 2 x 64."""
        text = dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
            tie_word_embeddings=True,
        )
        mar = dict(
            token_dim=16,
            grid_size=4,
            buffer_size=8,
            encoder_embed_dim=32,
            encoder_depth=2,
            encoder_num_heads=2,
            decoder_embed_dim=32,
            decoder_depth=2,
            decoder_num_heads=2,
        )
        head = dict(model_channels=64, num_res_blocks=2, cond_channels=32)
        vae = dict(block_out_channels=[32, 32, 64, 64, 128], sample_size=64)
        defaults = dict(image_token_id=500, image_size=64)
        defaults.update(kwargs)
        return cls(text_config=text, mar_config=mar, diffusion_head_config=head, vae_config=vae, **defaults)

    @classmethod
    def _preset(cls, text: dict, mar: tuple[int, int, int], head: tuple[int, int], **kwargs) -> HarmonConfig:
        width, depth, heads = mar
        mar_config = dict(
            encoder_embed_dim=width,
            encoder_depth=depth,
            encoder_num_heads=heads,
            decoder_embed_dim=width,
            decoder_depth=depth,
            decoder_num_heads=heads,
        )
        head_config = dict(num_res_blocks=head[0], model_channels=head[1], cond_channels=width)
        return cls(
            text_config=dict(text), mar_config=mar_config, diffusion_head_config=head_config, vae_config={}, **kwargs
        )


# Qwen2.5-Instruct text configs (from the public config.json files of the Qwen2.5 releases).
_QWEN25_COMMON = dict(
    model_type="qwen2",
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    tie_word_embeddings=True,
    vocab_size=151936,
    bos_token_id=151643,
    eos_token_id=151645,
    attention_dropout=0.0,
    use_sliding_window=False,
    sliding_window=None,
    max_window_layers=21,
)
_QWEN25_0_5B = dict(
    _QWEN25_COMMON,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
)
_QWEN25_1_5B = dict(
    _QWEN25_COMMON,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
)

__all__ = ["HarmonConfig", "HarmonMARConfig", "HarmonDiffusionHeadConfig", "HarmonVAEConfig"]
