"""The tiny fixture model as a pipeline folder, built once per test session (about 2 s).

`tiny_pipeline_dir()` converts `shared/fixtures/upstream-tiny` (64 px, random weights) with `harmon-hf convert`;
`fast_pipeline_dir()` is the same model whose scheduler samples the diffusion head in a few steps per MAR round (a
saved scheduler setting, so every default of the pipeline, the CLI and the app stays as a user gets it, only faster).
`flat_model_dir()` is the layout `examples/train.py` writes (model and processor files in one folder).
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from functools import cache
from pathlib import Path

import pytest
from fixture_utils import FIXTURE_DIR

requires_tiny = pytest.mark.skipif(
    not (FIXTURE_DIR / "harmon.pth").is_file(), reason=f"upstream fixture not found at {FIXTURE_DIR}"
)

FAST_DIFFUSION_STEPS = 4


@cache
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="harmon-tiny-"))


@cache
def tiny_pipeline_dir() -> Path:
    """The converter's output for the tiny fixture checkpoint."""
    from harmon_hf.convert import convert

    return convert(
        FIXTURE_DIR / "harmon.pth",
        FIXTURE_DIR / "kl16.ckpt",
        FIXTURE_DIR / "llm",
        _root() / "harmon-tiny",
        verbose=False,
    )


@cache
def fast_pipeline_dir(diffusion_steps: int = FAST_DIFFUSION_STEPS) -> Path:
    """`tiny_pipeline_dir()` with `scheduler.num_inference_steps = diffusion_steps` (default head steps per round)."""
    out = _root() / f"harmon-tiny-fast{diffusion_steps}"
    if not out.is_dir():
        shutil.copytree(tiny_pipeline_dir(), out)
        config_file = out / "scheduler" / "scheduler_config.json"
        config = json.loads(config_file.read_text())
        config["num_inference_steps"] = diffusion_steps
        config_file.write_text(json.dumps(config, indent=2))
    return out


@cache
def docs_pipeline_dir() -> Path:
    """`fast_pipeline_dir()` whose pipeline draws 32 px images by default (`default_image_size`, 2x2 tokens, so the
    default 64 MAR rounds clamp to 4): the documentation's examples run as written, in seconds."""
    out = _root() / "harmon-tiny-docs"
    if not out.is_dir():
        shutil.copytree(fast_pipeline_dir(), out)
        index_file = out / "model_index.json"
        index = json.loads(index_file.read_text())
        index["default_image_size"] = 32
        index_file.write_text(json.dumps(index, indent=2))
    return out


@cache
def flat_model_dir() -> Path:
    """The tiny model saved as a training output folder (config.json, weights and processor files side by side)."""
    from harmon_hf import HarmonForConditionalGeneration, HarmonProcessor

    out = _root() / "harmon-tiny-flat"
    if not out.is_dir():
        src = tiny_pipeline_dir()
        HarmonForConditionalGeneration.from_pretrained(src, subfolder="model").save_pretrained(out)
        HarmonProcessor.from_pretrained(src, subfolder="processor").save_pretrained(out)
    return out


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
