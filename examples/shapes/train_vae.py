"""Train the Harmon-Shapes autoencoder (a small kl16-layout `AutoencoderKL`) on CPU.

    python examples/shapes/train_vae.py --out /tmp/harmon-shapes-vae            # ~10 min on 2 cores
    python examples/shapes/train_vae.py --out /tmp/vae-smoke --steps 20 --eval-images 32

Writes OUT/vae (diffusers `save_pretrained`, safetensors), OUT/harmon_vae_config.json (the `HarmonVAEConfig`
fields), OUT/vae_report.json (timing, losses, latent statistics, held-out quality) and OUT/vae_reconstructions.png
(held-out pictures above their reconstructions).
"""

from __future__ import annotations

import argparse

from harmon_hf.shapes.vae import VAETrainingConfig, train_vae


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and train."""
    defaults = VAETrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--foreground-weight", type=float, default=defaults.foreground_weight)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--widths", type=int, nargs=5, default=list(defaults.block_out_channels))
    parser.add_argument("--layers-per-block", type=int, default=defaults.layers_per_block)
    parser.add_argument("--norm-groups", type=int, default=defaults.norm_num_groups)
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit_minutes, help="minutes (0: none)")
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images)
    parser.add_argument("--keep-scale", action="store_true", help="keep kl16's scaling_factor 0.2325")
    parser.add_argument(
        "--locality-weight", type=float, default=defaults.locality_weight, help="patch-locality term (0: off)"
    )
    parser.add_argument("--no-attention", action="store_true", help="no self-attention layers (convolutions only)")
    args = parser.parse_args(argv)
    config = VAETrainingConfig(
        block_out_channels=tuple(args.widths),
        layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_groups,
        resolution=args.resolution,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        foreground_weight=args.foreground_weight,
        time_limit_minutes=args.time_limit or None,
        seed=args.seed,
        num_threads=args.threads,
        log_every=max(1, min(50, args.steps // 10)),
        eval_images=args.eval_images,
        set_scaling_factor=not args.keep_scale,
        attention=not args.no_attention,
        locality_weight=args.locality_weight,
    )
    train_vae(config, args.out)


if __name__ == "__main__":
    main()
