"""Harmon's diffusion head: a small MLP with adaLN conditioning that denoises one latent token at a time.

Module names follow the upstream checkpoint (`mar.diffloss.net.*`) so the converter only strips a prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_harmon import HarmonDiffusionHeadConfig


def timestep_sinusoids(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, cosine half first.

    Args:
        timesteps: `(N,)` original (0..999) timesteps, any numeric dtype.
        dim: number of features (even).
    Returns:
        `(N, dim)` float32 features `[cos(t * f_k), sin(t * f_k)]` with `f_k = exp(-ln(max_period) * k / (dim/2))`.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class HarmonTimestepEmbedder(nn.Module):
    """Sinusoids -> Linear -> SiLU -> Linear. `mlp.0` / `mlp.2` as in the checkpoint."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """`(N,)` -> `(N, hidden_size)`."""
        features = timestep_sinusoids(timesteps, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class HarmonResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) = adaLN(SiLU(y))."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def modulation(self, y: torch.Tensor, activated: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(shift, 1 + scale, gate)` of the embedded condition `y` `(..., channels)`, each `(..., channels)`;
        `activated`: `y` is SiLU(y) already (`HarmonDiffusionHead.modulations` computes it once for every layer)."""
        out = self.adaLN_modulation[1](y) if activated else self.adaLN_modulation(y)
        shift, scale, gate = out.chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def forward_modulated(
        self, x: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The block given `modulation(y)` (same operations, so the same values as `forward(x, y)`)."""
        shift, scale1, gate = modulation
        h = self.in_ln(x) * scale1 + shift
        return x + gate * self.mlp(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_modulated(x, self.modulation(y))


class HarmonFinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by (shift, scale) = adaLN(SiLU(y)), then Linear to the output channels."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def modulation(self, y: torch.Tensor, activated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`(shift, 1 + scale)` of the embedded condition `y` `(..., channels)` (`activated`: as the block's)."""
        out = self.adaLN_modulation[1](y) if activated else self.adaLN_modulation(y)
        shift, scale = out.chunk(2, dim=-1)
        return shift, 1 + scale

    def forward_modulated(self, x: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift, scale1 = modulation
        return self.linear(self.norm_final(x) * scale1 + shift)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_modulated(x, self.modulation(y))


class HarmonDiffusionHead(nn.Module):
    """The denoising network of one token: `(x_t, t, condition) -> (eps, variance value)`.

    Shapes: `x` `(N, in_channels)`, `timesteps` `(N,)` original timesteps (0..999), `cond` `(N, cond_channels)`;
    output `(N, 2 * in_channels)` (eps first, then the learned-range variance value in [-1, 1]).
    """

    def __init__(self, config: HarmonDiffusionHeadConfig):
        super().__init__()
        self.config = config
        width = config.model_channels
        self.time_embed = HarmonTimestepEmbedder(width, config.frequency_embedding_size)
        self.cond_embed = nn.Linear(config.cond_channels, width)
        self.input_proj = nn.Linear(config.in_channels, width)
        self.res_blocks = nn.ModuleList([HarmonResBlock(width) for _ in range(config.num_res_blocks)])
        self.final_layer = HarmonFinalLayer(width, config.out_channels)
        # training-only read-out of the clean token from the condition (config.x0_readout_weight)
        self.x0_readout = nn.Linear(config.cond_channels, config.in_channels) if config.x0_readout_weight else None

    def embed_condition(self, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """y = t_emb + cond_embed(c): `(N,)`, `(N, cond_channels)` -> `(N, model_channels)`."""
        return self.time_embed(timesteps) + self.cond_embed(cond)

    def modulations(self, y: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Every adaLN modulation of the embedded condition `y` `(..., model_channels)`: one `(shift, 1 + scale,
        gate)` per residual block, then the final layer's `(shift, 1 + scale)`, each `(..., model_channels)`.

        They depend on the timestep only through `y`, so a sampler can compute them for many steps in one batched
        call (one large GEMM instead of one small GEMM per step; 60% of the head's weights are adaLN weights) and
        feed each step's slice to `forward_modulated`.

        Every adaLN layer starts with the same SiLU(y), computed here once for all of them (the same values; once
        per layer it took 8 % of the head's bfloat16 sampling time at 256 rows, and the head 4-6 % longer).
        """
        layers = [block.adaLN_modulation for block in self.res_blocks] + [self.final_layer.adaLN_modulation]
        if not all(type(layer[0]) is nn.SiLU for layer in layers):
            return [block.modulation(y) for block in self.res_blocks] + [self.final_layer.modulation(y)]
        activated = F.silu(y)
        return [block.modulation(activated, activated=True) for block in self.res_blocks] + [
            self.final_layer.modulation(activated, activated=True)
        ]

    def forward_modulated(self, x: torch.Tensor, modulations: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The network body given `modulations(y)`: `x` `(N, in_channels)` -> `(N, out_channels)`."""
        h = self.input_proj(x)
        for block, modulation in zip(self.res_blocks, modulations):
            h = block.forward_modulated(h, modulation)
        return self.final_layer.forward_modulated(h, modulations[-1])

    def inference_body(self) -> Callable[[torch.Tensor, Sequence[tuple[torch.Tensor, ...]]], torch.Tensor] | None:
        """`forward_modulated` for sampling loops: the same network as one closure over this head's weights.

        A sampling loop runs the body thousands of times on a few rows, where the cost is per-operation overhead,
        not arithmetic. The closure calls the functional ops directly (no module dispatch), fuses each
        `a * b + c` into one `addcmul` and applies SiLU in place: 6 tensor operations per residual block.
        The values are those of `forward_modulated` up to float rounding (a fused multiply-add rounds once).

        For inference only (no autograd through the in-place SiLU). Returns None when the head is not made of plain
        `nn.Linear` / `nn.LayerNorm` layers or carries forward hooks (LoRA adapters, accelerate offloading): the
        caller then uses `forward_modulated`, which respects them. The closure holds the current weight tensors:
        build it again after replacing parameters.
        """
        if not _plain_head(self):
            return None
        width = (self.config.model_channels,)
        # (in, out) views of the weights: addmm(bias, x, w.t()) is F.linear without its transpose op
        w_in, b_in = self.input_proj.weight.t(), self.input_proj.bias
        blocks = [
            (
                b.in_ln.weight,
                b.in_ln.bias,
                b.in_ln.eps,
                b.mlp[0].weight.t(),
                b.mlp[0].bias,
                b.mlp[2].weight.t(),
                b.mlp[2].bias,
            )
            for b in self.res_blocks
        ]
        final_eps = self.final_layer.norm_final.eps
        w_out, b_out = self.final_layer.linear.weight.t(), self.final_layer.linear.bias
        addmm, layer_norm, addcmul, silu = torch.addmm, F.layer_norm, torch.addcmul, F.silu

        def body(x: torch.Tensor, modulations: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
            h = addmm(b_in, x, w_in)
            for (ln_w, ln_b, ln_eps, w1, b1, w2, b2), (shift, scale1, gate) in zip(blocks, modulations):
                n = addcmul(shift, layer_norm(h, width, ln_w, ln_b, ln_eps), scale1)
                h = addcmul(h, gate, addmm(b2, silu(addmm(b1, n, w1), inplace=True), w2))
            shift, scale1 = modulations[-1]
            return addmm(b_out, addcmul(shift, layer_norm(h, width, None, None, final_eps), scale1), w_out)

        return body

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The network body given the already embedded condition `y` `(N, model_channels)`."""
        return self.forward_modulated(x, self.modulations(y))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        return self.forward_embedded(x, self.embed_condition(timesteps, cond))

    def forward_with_cfg(
        self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, guidance_scale: float | torch.Tensor
    ) -> torch.Tensor:
        """Classifier-free guidance on eps only.

        `x`, `cond` hold `[conditional rows; unconditional rows]` (N even). The network sees the FIRST half of `x`
        for both halves; eps = uncond + scale * (cond - uncond) is written to both halves while each half keeps its
        own variance values. Output `(N, out_channels)`.
        """
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), timesteps, cond)
        c = self.config.in_channels
        eps, rest = out[:, :c], out[:, c:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


def _plain_head(head: HarmonDiffusionHead) -> bool:
    """Whether `head` is built of the stock layers `inference_body` reads directly, without any forward hook."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for module in head.modules():
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return False
    linears = [head.input_proj, head.final_layer.linear]
    for block in head.res_blocks:
        if type(block.in_ln) is not nn.LayerNorm or type(block.mlp[1]) is not nn.SiLU:
            return False
        linears += [block.mlp[0], block.mlp[2]]
    return type(head.final_layer.norm_final) is nn.LayerNorm and all(type(m) is nn.Linear for m in linears)


__all__ = ["HarmonDiffusionHead", "timestep_sinusoids"]
