"""The benchmark scripts' own arithmetic and command lines (their timings are not tested, only what they count and
how they refuse bad options): `benchmarks/bench_head.py`, the head count of `benchmarks/_bench_utils.py` and the
prepared GPU call `benchmarks/gpu_table.sh` (in its CPU smoke mode)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_head  # noqa: E402
from _bench_utils import head_flops_per_row_step  # noqa: E402

from harmon_hf import HarmonConfig  # noqa: E402
from harmon_hf.modeling_diffusion_head import HarmonDiffusionHead  # noqa: E402


@pytest.mark.parametrize("build", [HarmonConfig.tiny, HarmonConfig.harmon_0_5b])
def test_head_flop_count_is_what_torch_counts(build) -> None:
    """`head_flops_per_row_step` (the analytic count behind `bench_head.py`'s GFLOP/s and `bench_generate.py`'s
    FLOPs) equals torch's FlopCounterMode on one step of the sampling path: the adaLN products plus the body, per
    row."""
    config = build().diffusion_head_config
    rows = 6
    with torch.device("meta"):
        head = HarmonDiffusionHead(config)
        x = torch.zeros(rows, config.in_channels)
        y = torch.zeros(rows, config.model_channels)
    with FlopCounterMode(display=False) as counter:
        head.forward_modulated(x, head.modulations(y))
    assert counter.get_total_flops() == rows * head_flops_per_row_step(config)


def test_bench_head_runs_and_reports_each_case(capsys) -> None:
    code = bench_head.main(
        ["--config", "tiny", "--dtypes", "fp32", "--rows", "2", "4", "--steps", "2", "--repeats", "1", "--threads", "1"]
    )
    assert code == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("fp32")]
    assert [int(line[1]) for line in lines] == [2, 4]
    assert all(float(line[2]) > 0 for line in lines)  # ms per step


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "3"], "--rows must be even numbers >= 2"),
        (["--rows", "0"], "--rows must be even numbers >= 2"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--rows-per-channel", "-1"], "--rows-per-channel must be >= 0"),
    ],
)
def test_bench_head_refuses_bad_options(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        bench_head.main(["--config", "tiny", *args])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def _can_compile_on_cpu() -> bool:
    """torch.compile's CPU backend builds C++ against the Python headers: a compiler and Python.h are needed."""
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(os.environ.get("CXX", "g++")) is not None and python_h.is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("bash") is None or not _can_compile_on_cpu(),
    reason="needs bash, a C++ compiler and the Python headers (torch.compile's CPU backend)",
)
def test_gpu_table_script_smoke_run(tmp_path) -> None:
    """`benchmarks/gpu_table.sh OUT cpu smoke` runs every step of the prepared GPU call on tiny shapes and writes the
    benchmark results where the summary says."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_table.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path), "cpu", "smoke"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("head", "head_compiled", "generate_1.5b", "generate_0.5b"):
        assert f"== {name}" in done.stdout
        assert (tmp_path / f"{name}.log").is_file()
    for name in ("generate_1.5b", "generate_0.5b"):
        results = json.loads((tmp_path / f"{name}.json").read_text())
        assert all(case["batches"]["1"]["s_per_image"] > 0 for case in results)
    assert "!!" not in done.stdout


def test_gpu_table_script_refuses_an_unknown_set(tmp_path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_table.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path), "cpu", "huge"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown SET huge" in done.stdout
