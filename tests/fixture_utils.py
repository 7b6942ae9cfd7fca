"""Access to the upstream golden data in `../shared/fixtures/upstream-tiny` (read-only) and its tolerances."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURE_DIR = Path(
    os.environ.get(
        "HARMON_FIXTURE_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "upstream-tiny"
    )
)

requires_fixture = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason=f"upstream fixture not found at {FIXTURE_DIR}")


@cache
def manifest() -> dict:
    return json.loads((FIXTURE_DIR / "manifest.json").read_text())


@cache
def fixture_json() -> dict:
    return json.loads((FIXTURE_DIR / "fixtures.json").read_text())


@cache
def load_tensors(filename: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE_DIR / filename))


def expected(filename: str, key: str) -> torch.Tensor:
    return load_tensors(filename)[key].clone()


def assert_fixture_close(actual: torch.Tensor, filename: str, key: str) -> None:
    """Compare `actual` with the fixture tensor `filename[key]` using the manifest's tolerances.

    Integer tensors must match exactly; tensors with `atol_along_dim0` are compared slice by slice along dim 0.
    """
    entry = manifest()["tensor_files"][filename]["tensors"][key]
    exp = load_tensors(filename)[key]
    actual = actual.detach().cpu()
    assert tuple(actual.shape) == tuple(exp.shape), (
        f"{filename}:{key} shape {tuple(actual.shape)} != {tuple(exp.shape)}"
    )
    if entry["role"] == "integer":
        torch.testing.assert_close(actual.to(exp.dtype), exp, atol=0, rtol=0, msg=lambda m: f"{filename}:{key}: {m}")
        return
    if entry["role"] == "uint8 levels":
        diff = (actual.to(torch.int64) - exp.to(torch.int64)).abs().max().item()
        assert diff <= entry["atol"], f"{filename}:{key}: max level difference {diff} > {entry['atol']}"
        return
    actual = actual.to(exp.dtype)
    per_slice = entry.get("atol_along_dim0")
    if per_slice is not None:
        for i, atol in enumerate(per_slice):
            torch.testing.assert_close(
                actual[i], exp[i], atol=atol, rtol=entry["rtol"], msg=lambda m, i=i: f"{filename}:{key}[{i}]: {m}"
            )
    else:
        torch.testing.assert_close(
            actual, exp, atol=entry["atol"], rtol=entry["rtol"], msg=lambda m: f"{filename}:{key}: {m}"
        )
