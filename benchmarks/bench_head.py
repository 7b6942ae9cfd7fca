"""The diffusion head's sampling loop alone: milliseconds per reverse step by number of rows, and the machine's peak.

    python benchmarks/bench_head.py --config small --dtypes fp32 bf16 --rows 32 256 512
    python benchmarks/bench_head.py --config small --rows 32 256 --compile     # torch.compile of the per-step body
    python benchmarks/bench_head.py --peak                                     # matrix-product GFLOP/s only
    python benchmarks/bench_head.py --rows 256 --rows-per-channel 1000000      # adaLN chunks by the byte budget only

Each case times `sample_tokens` (what every MAR round runs: 100 DDPM steps with guidance 3, the conditional half
stepped) on random conditions with a randomly initialised head of the config's shape, and reports the median time
per step, the head's arithmetic rate (its products, counted analytically as in `bench_generate.py`) and, with
`--compile`, the first call's compile time. Rows are cond + uncond rows: a batch of B images whose MAR round draws
T tokens each gives 2 * B * T rows. `--peak` adds the rate of a large `torch.mm` and of a head-sized 256 x 256 x 256
one, the ceiling the rates are compared with in docs/performance.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from _bench_utils import CONFIGS, DTYPES, fill_random_, head_flops_per_row_step

from harmon_hf import scheduling_harmon
from harmon_hf.modeling_diffusion_head import HarmonDiffusionHead
from harmon_hf.scheduling_harmon import HarmonDDPMScheduler, sample_tokens


@torch.no_grad()
def random_head(config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> HarmonDiffusionHead:
    """A head of `config`'s shape with random weights (`fill_random_`, as the benchmarks' whole models)."""
    head = HarmonDiffusionHead(config)
    fill_random_(head, torch.Generator().manual_seed(seed))
    return head.to(device=device, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(head, rows: int, steps: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(first call seconds, median seconds per step) of sampling `rows` rows (half cond, half uncond)."""
    scheduler = HarmonDDPMScheduler()
    cond = torch.randn(rows, head.config.cond_channels, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def run() -> float:
        sync(device)
        start = time.perf_counter()
        sample_tokens(head, cond, scheduler, steps, guidance_scale=3.0, generator=gen, conditional_only=True)
        sync(device)
        return time.perf_counter() - start

    with torch.no_grad():
        first = run()
        times = [run() for _ in range(repeats)]
    return first, statistics.median(times) / steps


def matmul_rate(n: int, k: int, m: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """GFLOP/s of repeated (n x k) @ (k x m) products (best of several timed batches)."""
    a = torch.randn(n, k, device=device).to(dtype)
    b = torch.randn(k, m, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    per_call = 2 * n * k * m
    reps = max(1, int(seconds * 2e11 / per_call))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return per_call / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS), help="whose head shape")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--rows", nargs="+", type=int, help="cond + uncond rows, even (default 32 256)")
    parser.add_argument("--steps", type=int, default=100, help="reverse steps per sampling call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (the median is reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile(dynamic=True) the per-step body")
    parser.add_argument(
        "--rows-per-channel",
        type=int,
        help="override scheduling_harmon.MODULATION_ROWS_PER_CHANNEL (rows of one batched adaLN product per channel "
        "of width; a huge value = as many steps per product as MODULATION_CHUNK_BYTES allows, the rule before it)",
    )
    parser.add_argument("--peak", action="store_true", help="the matmul peak (only that unless --rows is given)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    only_peak = args.peak and args.rows is None
    args.rows = args.rows or [32, 256]
    for rows in args.rows:
        if rows < 2 or rows % 2:
            parser.error(f"--rows must be even numbers >= 2 (cond + uncond rows), got {rows}")
    for name, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.rows_per_channel is not None:
        if args.rows_per_channel < 0:
            parser.error(f"--rows-per-channel must be >= 0, got {args.rows_per_channel}")
        scheduling_harmon.MODULATION_ROWS_PER_CHANNEL = args.rows_per_channel
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    if args.peak:
        print(f"{'dtype':6} {'product':>18} {'GFLOP/s':>9}")
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for shape in ((2048, 2048, 2048), (256, 256, 256)):
                rate = matmul_rate(*shape, dtype, device)
                print(f"{dtype_name:6} {' x '.join(map(str, shape)):>18} {rate:9.0f}")
    if only_peak:
        return 0

    config = CONFIGS[args.config].build().diffusion_head_config
    flops = head_flops_per_row_step(config)
    print(
        f"{args.config} head: {config.num_res_blocks} blocks x {config.model_channels}, "
        f"{flops / 1e6:.2f} MFLOP per row and step, {args.steps} steps per call"
    )
    print(f"{'dtype':6} {'rows':>6} {'ms/step':>9} {'GFLOP/s':>9} {'first call s':>13}")
    for dtype_name in args.dtypes:
        head = random_head(config, DTYPES[dtype_name], device)
        if args.compile:
            body = torch.compile(head.inference_body(), dynamic=True)
            head.inference_body = lambda body=body: body  # what sample_tokens calls once per sampling call
        for rows in args.rows:
            first, per_step = time_rows(head, rows, args.steps, args.repeats, device)
            rate = rows * flops / per_step / 1e9
            print(f"{dtype_name:6} {rows:6d} {per_step * 1e3:9.3f} {rate:9.0f} {first:13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
