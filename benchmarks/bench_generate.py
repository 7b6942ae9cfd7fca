"""Text-to-image speed of harmon-hf with random weights: seconds per image, images/s, peak memory, per-part time, FLOPs.

Each (config, dtype, rounds) case runs in a fresh subprocess (clean peak-memory numbers), builds a random-weight model
(meta device, filled in place: seconds, not minutes), warms up, then times `generate_image_tokens` +
`decode_image_tokens` (what `HarmonPipeline.__call__` runs, minus tokenisation and PIL conversion) with classifier-free
guidance, so batch 1 = 2 LLM/head rows per image, as upstream.

Examples:
    python benchmarks/bench_generate.py                                   # tiny + small, fp32 + bf16, batch 1 and 8
    python benchmarks/bench_generate.py --configs 0.5b --dtypes bf16 --rounds 4 16 --batch-sizes 1
    python benchmarks/bench_generate.py --configs small --scheduler dpm --diffusion-steps 20   # fast mode
    python benchmarks/bench_generate.py --configs small --dtypes bf16 --vae-dtype bf16   # bf16 VAE decode too
    python benchmarks/bench_generate.py --configs tiny --json results.json

Rounds below a configuration's nominal count (64 for the Harmon shapes) are flagged "reduced" in the table; when a
case is measured at two or more round counts the table adds a linear extrapolation to the nominal count (time per
image is affine in the rounds: fixed prefill + VAE, then per-round LLM/MAR/head work; the head's total rows do not
depend on the rounds, only its number of 100-step loops does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _bench_utils import (  # noqa: E402
    CONFIGS,
    DTYPES,
    PeakRSS,
    build_random_model,
    fmt_bytes,
    free_memory,
    head_flops_per_row_step,
    part_timers,
    rss_bytes,
)

from harmon_hf import HarmonConfig, HarmonForConditionalGeneration  # noqa: E402
from harmon_hf.scheduling_harmon import HarmonDDPMScheduler  # noqa: E402

try:
    from harmon_hf.pipeline_harmon import decode_in_slices
except ImportError:  # an older harmon_hf (before/after comparisons): one VAE call per image, as the pipeline does

    def decode_in_slices(model, tokens, batch_size=None):
        return torch.cat([model.decode_image_tokens(part) for part in tokens.split(batch_size or 1)])


try:
    from harmon_hf.pipeline_harmon import set_vae_dtype
except ImportError:  # an older harmon_hf

    def set_vae_dtype(model, dtype):
        model.model.vae.to(dtype)


PARTS = ("LLM", "MAR encoder", "MAR decoder", "diffusion head", "VAE decode")


# ----- FLOPs ---------------------------------------------------------------------------------------------------------
def vae_decode_flops(config: HarmonConfig, size: tuple[int, int]) -> int:
    """FLOPs of one VAE decode, counted by `torch.utils.flop_counter` on a meta-device copy (no compute)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**config.vae_config.to_autoencoder_kwargs())
        latents = torch.zeros(1, config.vae_config.latent_channels, *size)
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    return int(counter.get_total_flops())


def generation_flops(
    config: HarmonConfig,
    size: tuple[int, int],
    num_iter: int,
    prompt_len: int,
    guidance: bool = True,
    diffusion_steps: int = 100,
) -> dict[str, int]:
    """Analytic matmul/attention FLOPs (2 per multiply-add) of generating ONE image, per part.

    Follows `generate_image_tokens` exactly: prompt prefill on the cond + uncond rows; per round the MAR encoder and
    proj_in on the conditional row only (shared), the LLM / proj_out / MAR decoder on both rows, the head on both rows
    of the tokens predicted this round for `diffusion_steps` steps (+ its condition and timestep embeddings once per
    round); then one VAE decode. Attention is counted dense (as `torch.utils.flop_counter` counts SDPA, causal or not);
    norms and elementwise ops are ignored (< 1%).
    """
    text, mar, head = config.text_config, config.mar_config, config.diffusion_head_config
    rows = 2 if guidance else 1
    length = size[0] * size[1]
    buffer = mar.buffer_size
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q_width = text.num_attention_heads * head_dim
    kv_width = text.num_key_value_heads * head_dim
    llm_per_token = 2 * layers * (h * q_width + 2 * h * kv_width + q_width * h + 3 * h * inter)

    def llm(tokens: int, context: int) -> int:  # `tokens` new positions attending to `context` positions
        return tokens * llm_per_token + layers * 4 * tokens * context * q_width

    def vit(seq: int, dim: int, depth: int) -> int:
        hidden = int(dim * mar.mlp_ratio)
        return depth * (2 * seq * (4 * dim * dim + 2 * dim * hidden) + 4 * seq * seq * dim)

    enc, dec = mar.encoder_embed_dim, mar.decoder_embed_dim
    width = head.model_channels
    head_per_row_step = head_flops_per_row_step(head)
    flops = dict.fromkeys(PARTS, 0)
    flops["other"] = 0
    flops["LLM"] += rows * llm(prompt_len, prompt_len)
    schedule = HarmonForConditionalGeneration.mask_schedule(length, num_iter)
    masked = length
    for after in schedule:
        seq = buffer + (length - masked)
        flops["MAR encoder"] += 2 * length * mar.token_dim * enc + vit(seq, enc, mar.encoder_depth)
        flops["other"] += 2 * seq * (enc * h + h * h)  # proj_in (shared)
        flops["LLM"] += rows * llm(seq, prompt_len + seq)
        flops["other"] += rows * 2 * seq * (h * h + h * enc)  # proj_out
        flops["MAR decoder"] += rows * (2 * seq * enc * dec + vit(buffer + length, dec, mar.decoder_depth))
        predicted = rows * (masked - after)
        flops["diffusion head"] += predicted * (2 * dec * width + diffusion_steps * head_per_row_step)
        flops["diffusion head"] += 2 * diffusion_steps * (head.frequency_embedding_size * width + width * width)
        masked = after
    flops["VAE decode"] = vae_decode_flops(config, size)
    flops["total"] = sum(flops.values())
    return flops


# ----- one case (runs in a subprocess) ----------------------------------------------------------------------------
def make_scheduler(kind: str):
    """The head's sampler: "ddpm" (upstream's, default 100 steps) or a faster deterministic one on the same betas."""
    base = HarmonDDPMScheduler()
    if kind == "ddpm":
        return base
    if kind == "ddim":
        return base.compatible_scheduler("DDIMScheduler")
    if kind == "dpm":
        return base.compatible_scheduler("DPMSolverMultistepScheduler")
    raise ValueError(f"unknown scheduler {kind!r}")


def run_case(case: dict) -> dict:
    """Build the model of `case`, time it at each batch size, break one batch-1 run into parts. Returns a dict."""
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    bench = CONFIGS[case["config"]]
    config = bench.build()
    dtype = DTYPES[case["dtype"]]
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    model = build_random_model(config, dtype=dtype, device=device)
    # the model keeps its VAE float32 whatever `dtype` is; --vae-dtype casts it
    set_vae_dtype(model, DTYPES[case.get("vae_dtype") or "fp32"])
    build_s = time.perf_counter() - t0
    stride = config.image_stride
    size = (case["image_size"] // stride, case["image_size"] // stride)
    rounds = case["rounds"]
    scheduler = make_scheduler(case["scheduler"])
    guidance = case["guidance"]
    vocab = config.text_config.vocab_size

    @torch.no_grad()  # as HarmonPipeline.__call__ (without it the VAE decode builds an autograd graph)
    def generate(batch: int, seed: int, num_iter: int = rounds) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        rows = 2 * batch if guidance != 1.0 else batch
        ids = torch.randint(0, min(vocab, config.image_token_id), (rows, case["prompt_len"]), generator=gen)
        tokens = model.generate_image_tokens(
            ids.to(device),
            torch.ones_like(ids).to(device),
            size,
            num_iter=num_iter,
            guidance_scale=guidance,
            scheduler=scheduler,
            num_diffusion_steps=case["diffusion_steps"],
            generator=[torch.Generator(device).manual_seed(seed + i) for i in range(batch)],
        )
        images = decode_in_slices(model, tokens, case["vae_batch_size"])  # as HarmonPipeline decodes
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images

    result = dict(case, build_s=build_s, rss_model=rss_bytes() - rss_start, batches={})
    result["reduced"] = rounds < bench.reference_rounds
    result["reference_rounds"] = bench.reference_rounds
    result["parameters"] = sum(p.numel() for p in model.parameters())
    for _ in range(case["warmup"]):
        generate(1, 1234, num_iter=min(rounds, 2))
    for batch in case["batch_sizes"]:
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        with PeakRSS() as peak:
            for r in range(case["repeats"]):
                start = time.perf_counter()
                generate(batch, 100 * r)
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        entry = dict(
            times=times,
            s_per_image=median / batch,
            images_per_s=batch / median,
            peak_rss=peak.peak,
            peak_rss_above_start=peak.peak - rss_start,
        )
        if device.type == "cuda":
            entry["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        result["batches"][str(batch)] = entry
    if case["with_breakdown"]:
        with part_timers(model) as timer:
            start = time.perf_counter()
            generate(1, 7)
            total = time.perf_counter() - start
        parts = {name: timer.seconds.get(name, 0.0) for name in PARTS}
        parts["other"] = max(total - sum(parts.values()), 0.0)
        result["breakdown"] = dict(total_s=total, seconds=parts, calls=dict(timer.calls))
    result["flops_per_image"] = generation_flops(
        config,
        size,
        min(rounds, size[0] * size[1]),
        case["prompt_len"],
        guidance != 1.0,
        case["diffusion_steps"] or scheduler_steps(scheduler),
    )
    if case["measure_flops"]:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            generate(1, 9)
        result["flops_per_image_measured"] = int(counter.get_total_flops())
    return result


def scheduler_steps(scheduler) -> int:
    return getattr(scheduler.config, "num_inference_steps", None) or 100


# ----- driver ---------------------------------------------------------------------------------------------------------
def run_in_subprocess(case: dict) -> dict:
    cmd = [sys.executable, __file__, "--_case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    header = (
        f"{'config':7s} {'dtype':5s} {'size':>5s} {'rounds':>10s} {'sched':>9s} {'batch':>5s} {'s/image':>9s} "
        f"{'img/s':>7s} {'peak RSS':>10s} {'GFLOP/img':>10s}  breakdown (batch 1)"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        rounds = f"{res['rounds']}" + (" (red.)" if res["reduced"] else "")
        sched = f"{res['scheduler']}/{res['diffusion_steps'] or 100}"
        dtype = res["dtype"] + ("" if res.get("vae_dtype", "fp32") == "fp32" else f"+vae-{res['vae_dtype']}")
        parts = ""
        if isinstance(res.get("breakdown"), dict):
            total = res["breakdown"]["total_s"]
            parts = ", ".join(
                f"{k.replace('diffusion ', '').replace('MAR ', 'MAR-')} {100 * v / total:.0f}%"
                for k, v in res["breakdown"]["seconds"].items()
            )
        for batch, entry in res["batches"].items():
            mem = fmt_bytes(entry["peak_rss"])
            if "cuda_max_allocated" in entry:
                mem += f" / {fmt_bytes(entry['cuda_max_allocated'])} CUDA"
            print(
                f"{res['config']:7s} {dtype:5s} {res['image_size']:5d} {rounds:>10s} {sched:>9s} {batch:>5s} "
                f"{entry['s_per_image']:9.3f} {entry['images_per_s']:7.3f} {mem:>10s} "
                f"{res['flops_per_image']['total'] / 1e9:10.1f}  {parts if batch == '1' else ''}"
            )
            parts = ""
    # linear extrapolation to the nominal rounds where a case was measured at >= 2 round counts
    groups: dict[tuple, list[dict]] = {}
    for res in results:
        key = (
            res["config"],
            res["dtype"],
            res["image_size"],
            res["scheduler"],
            res["diffusion_steps"],
            res.get("vae_dtype", "fp32"),
        )
        groups.setdefault(key, []).append(res)
    for key, members in groups.items():
        counts = sorted({m["rounds"] for m in members})
        if len(counts) < 2 or max(counts) >= members[0]["reference_rounds"]:
            continue
        ref = members[0]["reference_rounds"]
        for batch in members[0]["batches"]:
            pts = [(m["rounds"], m["batches"][batch]["s_per_image"]) for m in members if batch in m["batches"]]
            (r0, t0), (r1, t1) = min(pts), max(pts)
            slope = (t1 - t0) / (r1 - r0)
            print(
                f"extrapolated {key[0]} {key[1]} {key[2]}px batch {batch}: {t0 + slope * (ref - r0):.1f} s/image at "
                f"{ref} rounds (from {r0} and {r1} rounds: {t0 - slope * r0:.2f} s fixed + {slope:.3f} s/round)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--rounds", nargs="+", type=int, help="MAR rounds (default: per config, 4 and 64 for 0.5b)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: per config)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=24, help="prompt tokens (random ids)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--scheduler", default="ddpm", choices=["ddpm", "ddim", "dpm"], help="the head's sampler")
    parser.add_argument("--diffusion-steps", type=int, help="head steps per round (default: the scheduler's, 100)")
    parser.add_argument("--vae-batch-size", type=int, help="images per VAE decode (default: as HarmonPipeline)")
    parser.add_argument(
        "--vae-dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="the VAE's dtype (default fp32, which the model keeps under any --dtypes)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each case")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-part timing run")
    parser.add_argument("--measure-flops", action="store_true", help="also count FLOPs with torch's FlopCounterMode")
    parser.add_argument("--in-process", action="store_true", help="run cases here (peak memory then accumulates)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._case:  # worker mode
        print(json.dumps(run_case(json.loads(args._case))))
        return 0
    if args.diffusion_steps is None and args.scheduler != "ddpm":
        args.diffusion_steps = 20
    results = []
    for name in args.configs:
        bench = CONFIGS[name]
        for dtype in args.dtypes:
            for rounds in args.rounds or bench.rounds:
                case = dict(
                    config=name,
                    dtype=dtype,
                    rounds=rounds,
                    image_size=args.size or bench.image_size,
                    batch_sizes=args.batch_sizes,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    prompt_len=args.prompt_len,
                    guidance=args.guidance,
                    scheduler=args.scheduler,
                    diffusion_steps=args.diffusion_steps,
                    device=args.device,
                    vae_batch_size=args.vae_batch_size,
                    vae_dtype=args.vae_dtype,
                    threads=args.threads,
                    with_breakdown=not args.no_breakdown,
                    measure_flops=args.measure_flops,
                )
                if rounds < bench.reference_rounds:
                    print(f"note: {name} runs {rounds} MAR rounds, reduced from its nominal {bench.reference_rounds}")
                print(f"running {name} {dtype} {rounds} rounds ...", file=sys.stderr, flush=True)
                res = run_case(case) if args.in_process else run_in_subprocess(case)
                results.append(res)
    print(f"device {args.device}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
