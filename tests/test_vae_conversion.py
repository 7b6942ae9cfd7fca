"""kl16 VAE conversion (upstream LDM keys -> diffusers `AutoencoderKL`) against the upstream golden data."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from fixture_utils import FIXTURE_DIR, assert_fixture_close, load_tensors

from harmon_hf.configuration_harmon import HarmonVAEConfig
from harmon_hf.convert_vae import (
    CheckpointError,
    build_vae,
    convert_vae_state_dict,
    infer_vae_config,
    load_upstream_vae,
    upstream_vae_state_dict,
)

KL16 = FIXTURE_DIR / "kl16.ckpt"
VAE_FILE = "vae.safetensors"


def meta_autoencoder(config: HarmonVAEConfig | None = None, **kwargs) -> AutoencoderKL:
    """An `AutoencoderKL` on the meta device: real key names and shapes, no memory, no init time."""
    with torch.device("meta"):
        return AutoencoderKL(**(config.to_autoencoder_kwargs() if config is not None else kwargs))


# --- fixtures ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> dict[str, torch.Tensor]:
    if not KL16.is_file():
        pytest.skip(f"upstream fixture not found at {FIXTURE_DIR}")
    return load_upstream_vae(KL16)


@pytest.fixture(scope="module")
def vae(upstream) -> AutoencoderKL:
    return build_vae(infer_vae_config(upstream), convert_vae_state_dict(upstream))


# --- the fixture checkpoint ----------------------------------------------------------------------------------------------


def test_inferred_config_matches_fixture(upstream):
    config = infer_vae_config(upstream)
    assert config.block_out_channels == [32, 32, 64, 64, 128]
    assert config.layers_per_block == 2
    assert config.latent_channels == 16
    assert config.norm_num_groups == 32
    assert config.down_block_types == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config.up_block_types == ["UpDecoderBlock2D"] * 5
    assert config.mid_block_add_attention is True
    assert (config.in_channels, config.out_channels) == (3, 3)
    assert config.scaling_factor == pytest.approx(0.2325)


def test_every_key_is_converted(upstream):
    converted = convert_vae_state_dict(upstream)
    reference = meta_autoencoder(infer_vae_config(upstream)).state_dict()
    assert len(converted) == len(upstream) == len(reference)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    # Spot checks of the non-obvious renames.
    assert converted["decoder.up_blocks.0.resnets.0.conv1.weight"] is upstream["decoder.up.4.block.0.conv1.weight"]
    assert converted["decoder.up_blocks.3.upsamplers.0.conv.bias"] is upstream["decoder.up.1.upsample.conv.bias"]
    assert (
        converted["encoder.down_blocks.4.resnets.0.conv_shortcut.weight"]
        is upstream["encoder.down.4.block.0.nin_shortcut.weight"]
    )
    assert torch.equal(
        converted["encoder.down_blocks.4.attentions.1.to_out.0.weight"],
        upstream["encoder.down.4.attn.1.proj_out.weight"][:, :, 0, 0],
    )
    # The inverse map restores the checkpoint exactly.
    back = upstream_vae_state_dict(converted)
    assert back.keys() == upstream.keys()
    assert all(torch.equal(back[k], upstream[k]) for k in upstream)


def test_encode_matches_fixture(vae):
    tensors = load_tensors(VAE_FILE)
    x = tensors["pixel_values"]
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(x))  # (b, 2 * 16, h/16, w/16)
        posterior = vae.encode(x).latent_dist
    assert_fixture_close(moments, VAE_FILE, "posterior_moments")
    assert_fixture_close(posterior.mode(), VAE_FILE, "posterior_mean")
    assert_fixture_close(posterior.logvar, VAE_FILE, "posterior_logvar_clamped")
    tokens = (posterior.mode() * vae.config.scaling_factor).permute(0, 2, 3, 1)  # (b, m, n, 16)
    assert_fixture_close(tokens, VAE_FILE, "harmon_encode")


def test_decode_matches_fixture(vae):
    tokens = load_tensors(VAE_FILE)["decode_input"]  # (b, m, n, 16)
    before = tokens.clone()
    latents = (tokens / vae.config.scaling_factor).permute(0, 3, 1, 2)  # (b, 16, m, n)
    with torch.no_grad():
        image = vae.decode(latents).sample  # post_quant_conv + decoder
    assert_fixture_close(image, VAE_FILE, "harmon_decode")
    assert torch.equal(tokens, before)  # unlike upstream, nothing is divided in place


def test_non_square_input(vae):
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
        image = vae.decode(mean).sample
    assert mean.shape == (2, 16, 4, 6)
    assert image.shape == (2, 3, 64, 96)
    assert torch.isfinite(image).all()


# --- the real (full-size) layout ---------------------------------------------------------------------------------------


def test_full_size_kl16_layout_is_inferred():
    default = HarmonVAEConfig()
    reference = meta_autoencoder(default).state_dict()
    upstream_like = upstream_vae_state_dict(reference)
    assert "encoder.down.4.attn.1.q.weight" in upstream_like
    assert upstream_like["encoder.down.4.attn.1.q.weight"].shape == (512, 512, 1, 1)
    inferred = infer_vae_config(upstream_like)
    assert inferred.to_autoencoder_kwargs() == default.to_autoencoder_kwargs()
    converted = convert_vae_state_dict(upstream_like)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.items()}
    num_params = sum(p.numel() for p in meta_autoencoder(default).parameters())
    assert 66.4e6 < num_params < 66.6e6


# --- bad inputs --------------------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as err:
        load_upstream_vae(tmp_path / "nope.ckpt")
    _one_line(err)


def test_truncated_file(tmp_path):
    if not KL16.is_file():
        pytest.skip("fixture missing")
    data = KL16.read_bytes()
    path = tmp_path / "half.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt") as err:
        load_upstream_vae(path)
    assert "half.ckpt" in _one_line(err)


def test_not_a_vae_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"layer.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match=r"not a kl16 VAE checkpoint: missing .*encoder\.conv_in\.weight") as err:
        load_upstream_vae(path)
    _one_line(err)
    torch.save({"mar.z_proj.weight": torch.zeros(2, 2), "llm.model.norm.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="Harmon model checkpoint"):
        load_upstream_vae(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_upstream_vae(path)
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "step": 3}, path)
    with pytest.raises(CheckpointError, match="non-tensor entries step"):
        load_upstream_vae(path)


def test_bare_state_dict_is_accepted(tmp_path):
    state = upstream_vae_state_dict(AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1).state_dict())
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    assert load_upstream_vae(path).keys() == state.keys()


def test_unknown_key_is_reported(upstream):
    state = dict(upstream, **{"loss.logvar": torch.zeros(())})
    with pytest.raises(CheckpointError, match=r"1 VAE checkpoint keys have no diffusers name: loss\.logvar") as err:
        convert_vae_state_dict(state)
    _one_line(err)
    with pytest.raises(CheckpointError, match=r"loss\.logvar"):
        infer_vae_config(state)


def test_attention_outside_last_level_is_rejected(upstream):
    state = {k.replace("encoder.down.4.attn.", "encoder.down.3.attn."): v for k, v in upstream.items()}
    with pytest.raises(CheckpointError, match=r"attention in levels \[3\]; only attention in the last level"):
        infer_vae_config(state)
    state = {k.replace("encoder.down.4.attn.", "decoder.up.4.attn."): v for k, v in upstream.items()}
    with pytest.raises(CheckpointError, match=r"decoder has attention in levels \[4\]"):
        infer_vae_config(state)


def test_decoder_needs_one_more_block_per_level(upstream):
    state = {k: v for k, v in upstream.items() if not k.startswith("decoder.up.2.block.2.")}
    with pytest.raises(
        CheckpointError, match=r"decoder level 2 has residual blocks \[0, 1\]; expected layers_per_block"
    ):
        infer_vae_config(state)


def test_widths_that_32_groups_cannot_split_are_rejected():
    reference = meta_autoencoder(
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[48, 96],
        norm_num_groups=16,
        latent_channels=16,
    ).state_dict()
    with pytest.raises(CheckpointError, match=r"widths \[48, 96\] are not all multiples of 32"):
        infer_vae_config(upstream_vae_state_dict(reference))


def test_inconsistent_shapes_are_rejected(upstream):
    state = dict(upstream)
    state["encoder.down.4.attn.0.q.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"shape mismatch encoder\.down_blocks\.4\.attentions\.0\.to_q\.weight"):
        infer_vae_config(state)
    state["encoder.down.4.attn.0.q.weight"] = torch.zeros(128, 128, 3, 3)
    with pytest.raises(CheckpointError, match="expected a 1x1 conv"):
        convert_vae_state_dict(state)


def test_build_vae_is_strict(upstream):
    config = infer_vae_config(upstream)
    converted = convert_vae_state_dict(upstream)
    partial = {k: v for k, v in converted.items() if k != "quant_conv.bias"}
    with pytest.raises(CheckpointError, match=r"missing quant_conv\.bias") as err:
        build_vae(config, partial)
    _one_line(err)
    with pytest.raises(CheckpointError, match=r"unexpected extra\.weight"):
        build_vae(config, dict(converted, **{"extra.weight": torch.zeros(1)}))
    wrong = dict(converted, **{"post_quant_conv.bias": torch.zeros(8)})
    with pytest.raises(
        CheckpointError, match=r"shape mismatch post_quant_conv\.bias: checkpoint \(8,\) vs model \(16,\)"
    ):
        build_vae(config, wrong)
    # The built module owns its weights (no aliasing of the caller's tensors) and is float32.
    vae = build_vae(config, {k: v.to(torch.bfloat16) for k, v in converted.items()})
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    vae = build_vae(config, converted)
    assert vae.quant_conv.weight.data_ptr() != converted["quant_conv.weight"].data_ptr()
