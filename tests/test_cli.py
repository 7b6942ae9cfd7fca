"""The `harmon-hf` command line on the tiny fixture model: help texts, one-line errors, generate, generate-batch
(resumable; two processes under `accelerate launch` give the files of one process), caption and chat (piped stdin).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_model import free_port, requires_tiny, tiny_pipeline_dir

from harmon_hf import cli

pytestmark = requires_tiny

FAST = ["--steps", "2", "--diffusion-steps", "3"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`harmon-hf ARGV` in this process -> (exit status, stdout, stderr); argparse exits are caught."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("HARMON_HF_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_pipeline_dir()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "picture.png"
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = (220, 30, 30)
    Image.fromarray(image).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_is_complete(capsys):
    parser = cli.build_parser()
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0
    commands = _subparsers(parser)
    assert {"generate", "generate-batch", "caption", "chat", "convert"} <= set(commands)
    for name in commands:
        assert name in out, f"harmon-hf --help does not list {name}"
    assert "examples:" in out
    for name, sub in commands.items():
        rc, text, _ = run_cli([name, "--help"], capsys)
        assert rc == 0
        assert "example" in text, f"'harmon-hf {name} --help' has no example"
        assert sub.description, f"{name} has no description"
        for action in sub._actions:
            if action.help is None and not isinstance(action, argparse._HelpAction):
                pytest.fail(f"harmon-hf {name}: option {action.option_strings or action.dest} has no help text")


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------
def test_errors_are_one_line(tmp_path, model_dir, capsys):
    bad_image = tmp_path / "broken.png"
    bad_image.write_text("not an image")
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a red cube"}\n{broken\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    m = str(model_dir)
    cases = [
        (["generate", "a red cube", "--model", str(tmp_path / "missing")], "model folder not found"),
        (["generate", "a red cube", "--model", str(not_model)], "not a Harmon model folder"),
        (["generate", "a red cube", "--model", m, "--size", "100"], "multiple of 16"),
        (["generate", "a red cube", "--model", m, "--height", "-16"], "multiple of 16"),
        (["generate", "a red cube", "--model", m, "--steps", "0"], "positive integer"),
        (["generate", "a red cube", "--model", m, "--guidance", "0.5"], ">= 1"),
        (["generate", "a red cube", "--model", m, "--temperature", "-1"], ">= 0"),
        (["generate", "a red cube", "--model", m, "--num-images", "zero"], "positive integer"),
        (["generate", "  ", "--model", m], "prompt is empty"),
        (["generate", "a red cube", "--model", m, "-o", str(tmp_path / "out.nope")], "unknown image file extension"),
        (["caption", str(bad_image), "--model", m], "cannot read image"),
        (["caption", str(tmp_path / "nothing.png"), "--model", m], "image not found"),
        (["chat", "--image", str(bad_image), "--model", m], "cannot read image"),
        (["generate-batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"), "--model", m], "not found"),
        (["generate-batch", str(bad_jsonl), "--out", str(tmp_path / "o"), "--model", m], "bad.jsonl:2"),
        (["generate-batch", str(empty), "--out", str(tmp_path / "o"), "--model", m], "holds no prompts"),
        (["generate-batch", str(empty), "--model", m], "--out"),
        (["convert", "--checkpoint", str(tmp_path / "x.pth"), "--vae", "v", "--llm", "l", "--output", "o"], ""),
        (["no-such-command"], "invalid choice"),
    ]
    for argv, expected in cases:
        rc, out, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert rc != 0, f"{argv}: exit status 0"
        assert len(lines) == 1, f"{argv}: error is not one line: {err!r}"
        assert "error" in lines[0] and expected in lines[0], f"{argv}: {lines[0]!r}"
        assert "Traceback" not in err + out


# ---------------------------------------------------------------------------------------------------------------
# generate, caption
# ---------------------------------------------------------------------------------------------------------------
def test_generate_seeds_and_files(tmp_path, model_dir, capsys):
    rc, out, err = run_cli(
        ["generate", "a red cube", "--model", str(model_dir), "-o", str(tmp_path / "cube.png"), "--seed", "7"]
        + ["--num-images", "2", "--quiet"]
        + FAST,
        capsys,
    )
    assert rc == 0, err
    assert "seed 7" in out
    images = [Image.open(tmp_path / f"cube_{i}.png") for i in range(2)]
    assert all(im.size == (64, 64) for im in images)
    # image i uses seed + i, so a single image with seed 8 is image 1 of the pair
    rc, _, err = run_cli(
        ["generate", "a red cube", "--model", str(model_dir), "-o", str(tmp_path / "one.png"), "--seed", "8"]
        + ["--quiet", "--width", "64", "--height", "64"]
        + FAST,
        capsys,
    )
    assert rc == 0, err
    single = np.asarray(Image.open(tmp_path / "one.png")).astype(int)
    assert np.abs(single - np.asarray(images[1]).astype(int)).max() <= 2  # batched float sums may round differently
    rc, _, err = run_cli(
        ["generate", "a wide view", "--model", str(model_dir), "-o", str(tmp_path / "wide.png"), "--quiet"]
        + ["--height", "32", "--width", "96", "--guidance", "1", "--temperature", "0"]
        + FAST,
        capsys,
    )
    assert rc == 0, err
    assert Image.open(tmp_path / "wide.png").size == (96, 32)
    # a bfloat16 VAE: the same picture up to rounding
    rc, _, err = run_cli(
        ["generate", "a red cube", "--model", str(model_dir), "-o", str(tmp_path / "vae16.png"), "--seed", "8"]
        + ["--quiet", "--vae-dtype", "bfloat16"]
        + FAST,
        capsys,
    )
    assert rc == 0, err
    half = np.asarray(Image.open(tmp_path / "vae16.png")).astype(int)
    assert np.abs(half - single).mean() < 2


def test_caption(model_dir, picture, capsys):
    rc, out, err = run_cli(
        ["caption", str(picture), "--model", str(model_dir), "--prompt", "What colour?", "--max-new-tokens", "4"],
        capsys,
    )
    assert rc == 0, err
    assert out.strip(), "no answer printed"


# ---------------------------------------------------------------------------------------------------------------
# generate-batch
# ---------------------------------------------------------------------------------------------------------------
def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        "a red cube",
        {"text": "a blue ball"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _batch_args(prompts: Path, out: Path, model_dir: Path) -> list[str]:
    return ["generate-batch", str(prompts), "--model", str(model_dir), "--out", str(out), "--num-images", "2"] + FAST


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def batch_reference(tmp_path_factory, model_dir) -> tuple[Path, Path]:
    """One single-process generate-batch run: (prompt file, output folder)."""
    root = tmp_path_factory.mktemp("batch")
    prompts = _prompt_file(root)
    out = root / "single"
    assert cli.main(_batch_args(prompts, out, model_dir)) == 0
    return prompts, out


def test_generate_batch_layout_and_resume(batch_reference, tmp_path, model_dir, capsys):
    prompts, reference = batch_reference
    files = _files(reference)
    assert set(files) == {"generate_batch.json"} | {
        f"{k:05d}/{name}" for k in range(3) for name in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")
    }
    assert json.loads(files["00000/metadata.jsonl"])["include"] == [{"class": "bench", "count": 1}]
    assert json.loads(files["00001/metadata.jsonl"]) == {"prompt": "a red cube"}
    assert json.loads(files["00002/metadata.jsonl"])["prompt"] == "a blue ball"
    settings = json.loads(files["generate_batch.json"])
    assert settings["num_images"] == 2 and settings["num_inference_steps"] == 2

    # an interrupted run: prompt 1 lost a sample, prompt 2 its metadata; a rerun redraws only what is missing
    out = tmp_path / "resumed"
    rc, _, err = run_cli(_batch_args(prompts, out, model_dir) + ["--batch-size", "2"], capsys)
    assert rc == 0, err
    (out / "00001" / "samples" / "0001.png").unlink()
    (out / "00002" / "metadata.jsonl").unlink()
    first = {k: v for k, v in _files(out).items()}
    rc, stdout, err = run_cli(_batch_args(prompts, out, model_dir), capsys)
    assert rc == 0, err
    assert "1 already done, 2 to draw" in stdout
    resumed = _files(out)
    assert set(resumed) == set(files)
    assert resumed["00000/samples/0000.png"] == first["00000/samples/0000.png"]  # untouched
    # the redrawn sample equals the one-process reference (batching may move a pixel level by rounding)
    for name in ("00001/samples/0001.png", "00002/samples/0000.png"):
        a = np.asarray(Image.open(out / name)).astype(int)
        b = np.asarray(Image.open(reference / name)).astype(int)
        assert np.abs(a - b).max() <= 2, name

    # nothing left: a rerun draws nothing; other settings are refused
    rc, stdout, _ = run_cli(_batch_args(prompts, out, model_dir), capsys)
    assert rc == 0 and "3 already done, 0 to draw" in stdout
    rc, _, err = run_cli(_batch_args(prompts, out, model_dir) + ["--guidance", "2"], capsys)
    assert rc == 1 and "guidance_scale" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_generate_batch_two_processes(batch_reference, tmp_path, model_dir):
    prompts, reference = batch_reference
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), "-m", "harmon_hf.cli"]
    cmd += _batch_args(prompts, out, model_dir) + ["--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "to draw on 2 process(es)" in proc.stdout
    assert "[0/2]" in proc.stdout and "[1/2]" in proc.stdout
    # same prompts, same seeds: the same files; the pictures may differ by a pixel level of float rounding (thread
    # counts differ between one process and two)
    got, want = _files(out), _files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith(".png"):
            a = np.asarray(Image.open(out / name)).astype(int)
            b = np.asarray(Image.open(reference / name)).astype(int)
            assert np.abs(a - b).max() <= 2, name
        else:
            assert got[name] == want[name], name


# ---------------------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------------------
def test_chat_with_piped_stdin(model_dir, picture, tmp_path):
    script = "\n".join(
        [
            f":image {tmp_path / 'missing.png'}",
            f":image {picture}",
            "What is in the picture?",
            ":nonsense",
            "And its colour?",
            ":reset",
            "Hello",
            ":quit",
            "never read",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "harmon_hf.cli", "chat", "--model", str(model_dir), "--max-new-tokens", "3"],
        input=script + "\n",
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "error: image not found" in out
    assert "(image added; 1 pending" in out
    assert out.count("harmon> ") == 3  # three questions answered; input after :quit ignored
    assert "unknown command ':nonsense'" in out
    assert "(conversation cleared)" in out
    assert "Traceback" not in proc.stderr
