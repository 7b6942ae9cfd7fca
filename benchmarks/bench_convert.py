"""Conversion time and peak memory of `harmon-hf convert` on a random-weight checkpoint of real Harmon shapes.

Writes, in the upstream formats, a random-weight `harmon.pth` (a flat `torch.save` dict with `llm.*`, `mar.*`,
`mar.diffloss.net.*`, `proj_in.*`, `proj_out.*` keys) and `kl16.ckpt` (`{"model": LDM-keyed VAE}`) of the chosen
shapes (default: Harmon-1.5B, bf16), plus an LLM folder (the Qwen2.5 config of those shapes and a small tokenizer:
the converter reads only the config and the tokenizer from it). Then runs the converter in a FRESH subprocess and
reports its wall time and peak resident memory above the interpreter's baseline (after `import torch, harmon_hf`),
against the size of the checkpoint files. The goal (issue #2): peak < 1.5x the checkpoint, i.e. no second full copy
of the weights held at once.

Examples:
    python benchmarks/bench_convert.py                                  # 1.5b, bf16 checkpoint and output
    python benchmarks/bench_convert.py --config 0.5b --dtype fp32
    python benchmarks/bench_convert.py --out-dtype bf16 --dtype fp32    # fp32 checkpoint written as bf16
    python benchmarks/bench_convert.py --dir /tmp/bench-convert         # keep (and reuse) the checkpoint
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

WRITER = r"""
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import torch
from _bench_utils import CONFIGS, DTYPES, build_random_model
from harmon_hf.convert import upstream_state_dict
from harmon_hf.shapes.tokenizer import save_tokenizer

torch.set_num_threads({threads})
folder = {folder!r}
start = time.perf_counter()
config = CONFIGS[{config!r}].build()
model = build_random_model(config, dtype=DTYPES[{dtype!r}])
harmon, vae = upstream_state_dict(model.state_dict())
# MAR's class embedding is in every upstream checkpoint (unused by Harmon; the converter drops it)
harmon["mar.class_emb.weight"] = torch.zeros(1000, config.mar_config.encoder_embed_dim, dtype=DTYPES[{dtype!r}])
torch.save(harmon, folder + "/harmon.pth")
torch.save({{"model": vae}}, folder + "/kl16.ckpt")
text = config.text_config.to_dict()
text["architectures"] = ["Qwen2ForCausalLM"]
save_tokenizer(folder + "/llm")
with open(folder + "/llm/config.json", "w") as f:
    json.dump(text, f, indent=1)
print(json.dumps(dict(seconds=time.perf_counter() - start, parameters=sum(p.numel() for p in model.parameters()))))
"""

CONVERTER = r"""
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import torch
import harmon_hf
from harmon_hf.convert import convert
from _bench_utils import PeakRSS, rss_bytes, status_peak_bytes

torch.set_num_threads({threads})
folder = {folder!r}
baseline = rss_bytes()
with PeakRSS(interval=0.002) as peak:
    start = time.perf_counter()
    convert(folder + "/harmon.pth", folder + "/kl16.ckpt", folder + "/llm", folder + "/converted",
            dtype={out_dtype!r}, overwrite=True, verbose=False)
    seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, baseline=baseline, peak=max(peak.peak, status_peak_bytes()))))
"""


def run_json(code: str) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def file_bytes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="1.5b", choices=["tiny", "small", "0.5b", "1.5b"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES), help="dtype of the checkpoint")
    parser.add_argument("--out-dtype", choices=sorted(DTYPE_NAMES), help="the converter's --dtype (default: --dtype)")
    parser.add_argument("--repeats", type=int, default=1, help="conversions (fresh processes; the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", help="work folder (kept; an existing checkpoint there is reused)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    from _bench_utils import fmt_bytes

    bench_dir = str(Path(__file__).resolve().parent)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="harmon-bench-convert-"))
    folder.mkdir(parents=True, exist_ok=True)
    out_dtype = DTYPE_NAMES[args.out_dtype or args.dtype]
    try:
        checkpoint, vae = folder / "harmon.pth", folder / "kl16.ckpt"
        written = None
        if not (checkpoint.is_file() and vae.is_file() and (folder / "llm" / "config.json").is_file()):
            print(f"writing a random {args.config} checkpoint ({args.dtype}) to {folder} ...", flush=True)
            written = run_json(
                WRITER.format(
                    bench_dir=bench_dir, threads=args.threads, folder=str(folder), config=args.config, dtype=args.dtype
                )
            )
            print(f"  {written['parameters'] / 1e6:.1f} M parameters in {written['seconds']:.1f} s", flush=True)
        size = file_bytes(checkpoint, vae)
        runs = []
        for i in range(args.repeats):
            result = run_json(
                CONVERTER.format(bench_dir=bench_dir, threads=args.threads, folder=str(folder), out_dtype=out_dtype)
            )
            result["peak_above_baseline"] = result["peak"] - result["baseline"]
            runs.append(result)
            print(
                f"  conversion {i + 1}: {result['seconds']:.1f} s, peak {fmt_bytes(result['peak_above_baseline'])} "
                "above the interpreter",
                flush=True,
            )
        runs.sort(key=lambda r: r["seconds"])
        median = runs[len(runs) // 2]
        peak = max(r["peak_above_baseline"] for r in runs)
        output_size = sum(p.stat().st_size for p in (folder / "converted").rglob("*.safetensors"))
        summary = dict(
            config=args.config,
            checkpoint_dtype=args.dtype,
            output_dtype=out_dtype,
            checkpoint_bytes=size,
            output_weights_bytes=output_size,
            seconds_median=median["seconds"],
            peak_above_baseline_bytes=peak,
            peak_over_checkpoint=peak / size,
            runs=runs,
            write=written,
        )
        print()
        print("| shapes | checkpoint | output | convert s | peak RSS above baseline | peak / checkpoint |")
        print("|---|---|---|---|---|---|")
        print(
            f"| {args.config} | {fmt_bytes(size)} {args.dtype} | {fmt_bytes(output_size)} {out_dtype} | "
            f"{median['seconds']:.1f} | {fmt_bytes(peak)} | {peak / size:.2f}x |"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"(bench_convert: {time.perf_counter() - start:.0f} s in all)")
    sys.exit(code)
