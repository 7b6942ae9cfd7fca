"""The MAR encoder/decoder of Harmon: timm-style pre-norm ViT blocks over VAE latent tokens plus buffer slots.

Parameter names follow the upstream checkpoint (`mar.*`) so the converter only renames the prefix; the attention
keeps timm's fused `qkv` projection (bit parity with upstream, and LoRA works on a fused Linear too).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_harmon import HarmonMARConfig


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q/k/v `(B, heads, S, head_dim)` -> output `(B, S, heads, head_dim)`, weights."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class HarmonMARAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused `qkv` projection (with bias)."""

    def __init__(self, config: HarmonMARConfig, dim: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.projection_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, S, dim)` -> `(B, S, dim)`."""
        batch, seq, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.proj_drop(self.proj(out.reshape(batch, seq, dim)))


class HarmonMARMLP(nn.Module):
    def __init__(self, config: HarmonMARConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(config.projection_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class HarmonMARBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, config: HarmonMARConfig, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = HarmonMARAttention(config, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = HarmonMARMLP(config, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


def resize_position_table(table: torch.Tensor, grid: int, size: tuple[int, int], buffer_size: int) -> torch.Tensor:
    """Resize the image part of a learned position table to another token grid.

    Args:
        table: `(1, buffer_size + grid*grid, C)`; the first `buffer_size` rows belong to the buffer slots.
        grid: side of the grid the table was trained for.
        size: target grid `(m, n)`; may be non-square.
    Returns:
        `(1, buffer_size + m*n, C)`: the buffer rows unchanged, the image rows bilinearly resized
        (align_corners=False, no antialias) and flattened row-major. The table itself if the grid is unchanged.
    """
    m, n = size
    if (m, n) == (grid, grid):
        return table
    buffer, image = table[:, :buffer_size], table[:, buffer_size:]
    channels = image.shape[-1]
    image = image.reshape(1, grid, grid, channels).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=(m, n), mode="bilinear", align_corners=False).to(table.dtype)
    image = image.permute(0, 2, 3, 1).reshape(1, m * n, channels)
    return torch.cat([buffer, image], dim=1)


class HarmonMAR(nn.Module):
    """MAR encoder and decoder.

    Encoder: `(B, L, token_dim)` latent tokens (+ a mask of unknown tokens) -> `(B, buffer + kept, enc_dim)`.
    Decoder: that sequence -> `(B, L, dec_dim)` per-token conditions of the diffusion head.
    Masks are `(B, L)` with 1 (or True) = masked/unknown; every row must mask the same number of tokens.
    """

    def __init__(self, config: HarmonMARConfig):
        super().__init__()
        self.config = config
        enc, dec = config.encoder_embed_dim, config.decoder_embed_dim
        buffer, seq = config.buffer_size, config.seq_len
        self.z_proj = nn.Linear(config.token_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=config.layer_norm_eps)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer + seq, enc))
        self.encoder_blocks = nn.ModuleList(
            [HarmonMARBlock(config, enc, config.encoder_num_heads) for _ in range(config.encoder_depth)]
        )
        self.encoder_norm = nn.LayerNorm(enc, eps=config.layer_norm_eps)
        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer + seq, dec))
        self.decoder_blocks = nn.ModuleList(
            [HarmonMARBlock(config, dec, config.decoder_num_heads) for _ in range(config.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dec, eps=config.layer_norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq, dec))

    def _table(self, table: torch.Tensor, size: tuple[int, int], with_buffer: bool = True) -> torch.Tensor:
        buffer = self.config.buffer_size if with_buffer else 0
        return resize_position_table(table, self.config.grid_size, size, buffer)

    def _keep_mask(self, mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """`(B, buffer + L)` bool: True where a slot is kept (the buffer always is)."""
        keep = torch.ones(batch, self.config.buffer_size + length, dtype=torch.bool, device=device)
        if mask is not None:
            if mask.shape != (batch, length):
                raise ValueError(f"mask must have shape {(batch, length)}, got {tuple(mask.shape)}")
            keep[:, self.config.buffer_size :] = ~mask.bool()
            counts = keep.sum(dim=1)
            if (counts != counts[0]).any():
                raise ValueError(f"every row must mask the same number of tokens, got kept counts {counts.tolist()}")
        return keep

    def encode(self, tokens: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """MAR encoder.

        Args:
            tokens: `(B, L, token_dim)` latent tokens in raster order, `L = m * n`.
            size: token grid `(m, n)`.
            mask: optional `(B, L)`, 1 = unknown (dropped before the blocks).
        Returns:
            `(B, buffer + kept, enc_dim)`: the buffer slots first, then the kept tokens in raster order.
        """
        batch, length, _ = tokens.shape
        if length != size[0] * size[1]:
            raise ValueError(f"{length} tokens do not fill a {size[0]}x{size[1]} grid")
        x = self.z_proj(tokens)
        # The buffer slots hold `fake_latent` directly (it is not passed through z_proj).
        buffer = self.fake_latent.to(x.dtype).expand(batch, self.config.buffer_size, -1)
        x = torch.cat([buffer, x], dim=1)
        x = x + self._table(self.encoder_pos_embed_learned, size).to(x.dtype)
        x = self.z_proj_ln(x)
        if mask is not None:
            keep = self._keep_mask(mask, batch, length, x.device)
            x = x[keep].reshape(batch, -1, x.shape[-1])
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def decode(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """MAR decoder.

        Args:
            x: `(B, buffer + kept, enc_dim)` encoder output (buffer first).
            size: token grid `(m, n)`.
            mask: the `(B, L)` mask used by the encoder (1 = unknown), or None.
        Returns:
            `(B, L, dec_dim)` conditions of the diffusion head, one per token, in raster order.
        """
        batch = x.shape[0]
        length = size[0] * size[1]
        x = self.decoder_embed(x)
        if mask is not None:
            keep = self._keep_mask(mask, batch, length, x.device)
            full = self.mask_token.to(x.dtype).expand(batch, keep.shape[1], -1).clone()
            full[keep] = x.reshape(-1, x.shape[-1])
            x = full
        x = x + self._table(self.decoder_pos_embed_learned, size).to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.config.buffer_size :]
        return x + self._table(self.diffusion_pos_embed_learned, size, with_buffer=False).to(x.dtype)


__all__ = ["HarmonMAR", "HarmonMARBlock", "resize_position_table"]
