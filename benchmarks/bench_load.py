"""Load time and peak memory of `HarmonForConditionalGeneration.from_pretrained` on a 0.5B-shaped checkpoint.

Writes a random-weight model of the Harmon-0.5B shapes in the converter's output format (`save_pretrained`:
safetensors, config dtype = the saved dtype, VAE in float32), then loads it N times, each in a FRESH subprocess
(nothing cached in the interpreter; the file itself is in the OS page cache after the first run, as on any machine
that loads a model twice), and reports the median load time and the peak RSS above the interpreter's baseline
(after `import torch, harmon_hf`) against the weights' size on disk.

Examples:
    python benchmarks/bench_load.py                         # 0.5b, bf16, 3 loads
    python benchmarks/bench_load.py --dtype fp32 --repeats 5 --json load.json
    python benchmarks/bench_load.py --dir /tmp/harmon-0.5b  # keep (and reuse) the checkpoint
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORKER = r"""
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import torch
import harmon_hf
from harmon_hf import HarmonForConditionalGeneration
from _bench_utils import PeakRSS, rss_bytes, status_peak_bytes
torch.set_num_threads({threads})
baseline = rss_bytes()
with PeakRSS(interval=0.002) as peak:
    start = time.perf_counter()
    model = HarmonForConditionalGeneration.from_pretrained({path!r}, dtype="auto")
    seconds = time.perf_counter() - start
    after_load = rss_bytes()
    # safetensors tensors may stay memory-mapped and lazily paged in: read one element of every page so that the
    # weights are resident, as after a first forward
    with torch.no_grad():
        for param in model.parameters():
            flat = param.detach().reshape(-1)
            flat[:: max(1, 4096 // flat.element_size())].float().sum()
    touched_s = time.perf_counter() - start
dtypes = sorted({{str(p.dtype) for p in model.parameters()}})
print(json.dumps(dict(seconds=seconds, touched_s=touched_s, baseline=baseline, after_load=after_load,
                      peak=max(peak.peak, status_peak_bytes()), after=rss_bytes(), dtypes=dtypes,
                      vae_dtype=str(model.model.vae.dtype))))
"""


def write_checkpoint(path: Path, config_name: str, dtype_name: str) -> float:
    """Save a random-weight model to `path` (the converter's `model/` layout). Returns the seconds it took."""
    import torch
    from _bench_utils import CONFIGS, DTYPES, build_random_model

    start = time.perf_counter()
    config = CONFIGS[config_name].build()
    model = build_random_model(config, dtype=DTYPES[dtype_name])
    model.config.dtype = DTYPES[dtype_name]
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return time.perf_counter() - start


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="0.5b", choices=["tiny", "small", "0.5b", "1.5b"])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", help="checkpoint folder (kept; reused if it already holds a model)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    tmp = None
    if args.dir:
        path = Path(args.dir)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="harmon-bench-load-"))
        path = tmp / "model"
    try:
        save_s = None
        if not (path / "config.json").is_file():
            save_s = write_checkpoint(path, args.config, args.dtype)
        size = weights_bytes(path)
        runs = []
        code = WORKER.format(bench_dir=str(Path(__file__).resolve().parent), threads=args.threads, path=str(path))
        for _ in range(args.repeats):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-4000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        seconds = statistics.median(r["seconds"] for r in runs)
        touched = statistics.median(r["touched_s"] for r in runs)
        above = statistics.median(r["peak"] - r["baseline"] for r in runs)
        result = dict(
            config=args.config,
            dtype=args.dtype,
            weights_bytes=size,
            save_s=save_s,
            load_s=seconds,
            load_s_all=[r["seconds"] for r in runs],
            load_and_touch_s=touched,
            peak_above_baseline=above,
            peak_over_weights=above / size,
            param_dtypes=runs[0]["dtypes"],
            vae_dtype=runs[0]["vae_dtype"],
            runs=runs,
        )
        print(
            f"{args.config} {args.dtype}: weights {size / 2**30:.2f} GiB; from_pretrained median {seconds:.2f} s "
            f"(runs {', '.join(f'{r:.2f}' for r in result['load_s_all'])}), {touched:.2f} s with every weight page "
            f"read; peak RSS above baseline "
            f"{above / 2**30:.2f} GiB = {above / size:.2f}x the weights; parameter dtypes {result['param_dtypes']}"
            + (f"; checkpoint written in {save_s:.1f} s" if save_s else "")
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
