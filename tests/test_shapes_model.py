"""The embedded default model (Harmon-Shapes) and the `harmon-hf eval-shapes` command.

Fast (about 30 s on 2 cores): the shipped weights load offline, draw a picture, answer about it, and the ShapesEval
command runs on a tiny subset. The full ShapesEval of the model card is `test_shipped_model_card_numbers_hold` (slow).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from example_scripts import load_example

from harmon_hf import cli
from harmon_hf.default_model import DEFAULT_MODEL_DIR, default_model_path
from harmon_hf.shapes.data import PALETTE, ShapesWorld, make_scene

MAX_WEIGHT_BYTES = 25 * 10**6


@pytest.fixture(autouse=True)
def _no_model_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # The commands below must find the embedded model by themselves.
    monkeypatch.delenv("HARMON_MODEL", raising=False)


@pytest.fixture(scope="module")
def pipe():
    from harmon_hf.pipeline_harmon import HarmonPipeline

    pipeline = HarmonPipeline.from_pretrained(default_model_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_default_model_is_a_small_pipeline_folder() -> None:
    folder = default_model_path()
    assert folder == DEFAULT_MODEL_DIR
    for name in ("model_index.json", "model/config.json", "model/model.safetensors", "scheduler", "processor"):
        assert (folder / name).exists(), name
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert 0 < weights <= MAX_WEIGHT_BYTES
    assert not list(folder.rglob("*.bin")), "weights ship as safetensors only"


def test_default_model_generates_an_image(pipe) -> None:
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    size = pipe.model.config.image_size
    assert image.size == (size, size)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)  # (H*W, 3)
    assert pixels.std() > 5, "a blank picture"


def test_default_model_answers_about_an_image(pipe) -> None:
    from harmon_hf.shapes.run_eval import make_answer_fn

    scene = make_scene(0, "test", 1234, "single")
    answer = make_answer_fn(pipe.model, pipe.processor)(scene.render(ShapesWorld()), "What color is the shape?")
    assert answer.strip().lower() in PALETTE, answer


def test_cli_generate_then_caption_without_model_argument(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "red_circle.png"
    assert cli.main(["generate", "a red circle", "-o", str(out), "--seed", "0", "--quiet"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert cli.main(["caption", str(out)]) == 0
    caption = capsys.readouterr().out.strip()
    assert caption, "empty caption"


def test_cli_eval_shapes_on_a_tiny_subset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = tmp_path / "eval.json"
    argv = ["eval-shapes", "--n", "1", "--json", str(report), "--steps", "4", "--batch-size", "3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "generation" in printed and "understanding" in printed
    results = json.loads(report.read_text())
    assert set(results["generation"]) == {"single", "pair", "count", "overall"}
    assert results["generation"]["overall"]["n"] == 3
    assert results["understanding"]["overall"]["n"] >= 3
    assert results["config"]["model"] == str(default_model_path())
    assert len(results["items"]["generation"]) == 3


def test_eval_shapes_fast_head_sampler(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The fast mode of the model card: DPM-Solver on the head with few steps, recorded in the result."""
    report = tmp_path / "eval.json"
    argv = ["eval-shapes", "--n", "1", "--json", str(report), "--tasks", "generation", "--kinds", "single"]
    assert cli.main([*argv, "--steps", "2", "--sampler", "dpm", "--diffusion-steps", "5"]) == 0
    sampling = json.loads(report.read_text())["config"]["sampling"]
    assert sampling["sampler"] == "dpm" and sampling["diffusion_steps"] == 5
    assert json.loads(report.read_text())["config"]["vae_dtype"] == "float32"
    assert cli.main([*argv, "--steps", "2", "--vae-dtype", "bfloat16"]) == 0
    assert json.loads(report.read_text())["config"]["vae_dtype"] == "bfloat16"
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.main([*argv, "--sampler", "euler"])


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_bfloat16_vae_draws_the_same_pictures_up_to_rounding(pipe) -> None:
    """`set_vae_dtype` (the commands' `--vae-dtype`): a bfloat16 VAE decodes the shipped model's tokens to the
    float32 VAE's pictures up to rounding (measured: PSNR 54 dB on 8-bit pixels), the three 64 px pictures in one
    decode call on a CPU in either dtype (`CPU_VAE_PIXELS_PER_CALL`); bad dtypes are refused and nothing is cast;
    diffusers' warning about casting a model with fp32-kept modules (it has none) is not printed."""
    from harmon_hf.pipeline_harmon import decode_in_slices, set_vae_dtype

    model = pipe.model
    prompts = ["a red circle", "a green square to the left of a cyan circle", "three purple triangles"]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    tokens = pipe(prompts, num_inference_steps=4, num_diffusion_steps=20, generator=gens, output_type="latent").images
    calls = []
    original = model.decode_image_tokens

    def counting(part: torch.Tensor) -> torch.Tensor:
        calls.append(part.shape[0])
        return original(part)

    model.decode_image_tokens = counting
    try:
        with torch.no_grad():
            full = decode_in_slices(model, tokens)
            assert calls == [3]
            for bad in (torch.int8, "bfloat16"):
                with pytest.raises(ValueError, match="floating-point torch.dtype"):
                    set_vae_dtype(model, bad)
            assert model.model.vae.dtype == torch.float32
            warnings = _Collect()
            logging.getLogger("diffusers.models.modeling_utils").addHandler(warnings)
            try:
                set_vae_dtype(model, torch.bfloat16)
            finally:
                logging.getLogger("diffusers.models.modeling_utils").removeHandler(warnings)
            assert not any("Casting directly" in message for message in warnings.messages)
            half = decode_in_slices(model, tokens)
            assert calls == [3, 3] and half.dtype == torch.bfloat16
    finally:
        set_vae_dtype(model, torch.float32)
        del model.decode_image_tokens
    assert model.model.vae.dtype == torch.float32
    to_8bit = lambda x: ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = (to_8bit(full) - to_8bit(half)).pow(2).mean()
    assert 10 * torch.log10(255**2 / mse) > 40


def test_cli_eval_shapes_rejects_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["eval-shapes", "--model", str(tmp_path / "nowhere"), "--n", "1"]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_model_card_numbers_hold() -> None:
    """The model card's ShapesEval (50 held-out scenes per kind; about 2 minutes on 2 cores), recorded in the shipped
    `shapes_eval.json`, is what the shipped folder measures now (seeded; a few items may flip across CPUs).

    The issue's targets (generation single >= 0.8, pair >= 0.5; understanding colour and shape >= 0.9) are reported
    in `results["targets"]` and in the card; this model meets some of them at some seeds and misses colour (see the
    card), so they are not asserted here. The sampling settings are the folder's defaults (one MAR round).
    """
    from harmon_hf.shapes.run_eval import evaluate_model

    recorded = json.loads((default_model_path() / "shapes_eval.json").read_text())
    results = evaluate_model(
        default_model_path(), n=recorded["config"]["n"], seed=recorded["config"]["seed"], verbose=False
    )
    assert results["config"]["sampling"] == recorded["config"]["sampling"]
    for task in ("generation", "understanding"):
        for key, entry in recorded[task].items():
            measured = results[task][key]["accuracy"]
            assert measured == pytest.approx(entry["accuracy"], abs=0.05), (task, key, measured, entry["accuracy"])
    for name, target in recorded["targets"].items():
        assert results["targets"][name]["threshold"] == target["threshold"]


def test_context_probe_ridge_baseline_and_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """examples/shapes/context_probe.py: the ridge baseline separates redundant tokens (pictures with 5 degrees of
    freedom: the other tokens determine each one) from independent ones, and the MAR probe runs on the shipped
    model, with clear errors for a file that is not a latent cache."""
    from safetensors.torch import save_file

    probe = load_example("shapes/context_probe.py")
    gen = torch.Generator().manual_seed(0)
    redundant = (torch.randn(400, 5, generator=gen) @ torch.randn(5, 16 * 16, generator=gen)).reshape(400, 16, 16)
    independent = torch.randn(400, 16, 16, generator=gen)
    mean_mse, context_mse = probe.ridge_context_mse(redundant[:300], redundant[300:])
    assert context_mse < 0.01 * mean_mse
    mean_mse, context_mse = probe.ridge_context_mse(independent[:300], independent[300:])
    assert context_mse > 0.9 * mean_mse

    cache = tmp_path / "latents_64px.safetensors"
    tokens = torch.cat([redundant, redundant[:10]]).reshape(-1, 4, 4, 16)  # duplicates are dropped before the split
    save_file({"tokens": tokens.contiguous(), "valid": torch.ones(len(tokens), dtype=torch.uint8)}, str(cache))
    assert probe.load_tokens(cache).shape == (400, 16, 16)
    argv = ["--model", str(default_model_path()), "--latents", str(cache), "--steps", "2", "--eval-every", "1"]
    results = probe.main(argv)
    assert sorted(results) == [0, 8, 15] and all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert "step 2: held-out MSE" in capsys.readouterr().out

    save_file({"other": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a latent cache"):
        probe.load_tokens(tmp_path / "bad.safetensors")


def test_binding_probe_on_the_shipped_model(tmp_path: Path) -> None:
    """examples/shapes/binding_probe.py: a prompt's slot conditions do not depend on the other prompts of the batch
    (right padding), and the card's numbers hold (relation word and swapped phrasing ~30 %, the same meaning in the
    other phrasing ~6 %, other axis ~70 %: the conditions say which object goes where); a pair of equal objects is
    refused before the model is loaded."""
    from harmon_hf.shapes.run_eval import load_model

    probe = load_example("shapes/binding_probe.py")
    _, model, processor = load_model(default_model_path())
    prompts = ["a red circle to the left of a blue square", "a green triangle"]
    together = probe.slot_conditions(model, processor, prompts)
    alone = probe.slot_conditions(model, processor, prompts[:1])
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)

    result = probe.main(["--json", str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text()) == result
    for side in ("left", "right"):
        for swap in ("other relation word (objects swap)", "swapped phrasing (objects swap)"):
            assert 0.2 < result[swap][side] < 0.45
        assert result["same meaning, other phrasing"][side] < 0.1
        assert 0.5 < result["other axis"][side] < 0.9
    with pytest.raises(SystemExit):
        probe.main(["--colours", "red", "red", "--shapes", "circle", "circle"])


def test_order_probe_labels_and_a_short_run(tmp_path: Path) -> None:
    """examples/shapes/order_probe.py: each token's label is the object of its half (the relation word and the
    phrasing decide which), a short run trains and reports, and bad arguments are refused."""
    from harmon_hf.shapes.data import PALETTE, SHAPES, ObjectSpec, PromptSpec

    probe = load_example("shapes/order_probe.py")
    colours, shapes = list(PALETTE), list(SHAPES)
    red, blue = ObjectSpec("red", "circle"), ObjectSpec("blue", "square")
    left = probe.side_labels(PromptSpec("pair", (red, blue), relation="left"), colours, shapes).reshape(4, 4)
    right = probe.side_labels(PromptSpec("pair", (blue, red), relation="right"), colours, shapes).reshape(4, 4)
    above = probe.side_labels(PromptSpec("pair", (red, blue), relation="above"), colours, shapes).reshape(4, 4)
    red_id, blue_id = (
        colours.index("red") * 3 + shapes.index("circle"),
        colours.index("blue") * 3 + shapes.index("square"),
    )
    assert torch.equal(left, right)
    assert (left[:, :2] == red_id).all() and (left[:, 2:] == blue_id).all()
    assert (above[:2] == red_id).all() and (above[2:] == blue_id).all()

    out = tmp_path / "history.json"
    history = probe.main(["--steps", "2", "--batch", "4", "--eval-n", "4", "--log", "1", "--json", str(out)])
    assert [row["step"] for row in history] == [1, 2] and json.loads(out.read_text()) == history
    assert all(0.0 <= row[k] <= 1.0 for row in history for k in ("train_token", "test_token", "test_all"))
    assert torch.isfinite(torch.tensor([row["loss"] for row in history])).all()
    frozen = probe.main(["--init", "shipped", "--linear", "--steps", "1", "--batch", "4", "--eval-n", "4"])
    assert len(frozen) == 1
    bad_runs = (["--steps", "0"], ["--init", "shipped", "--layers", "6"], ["--layers", "-1"], ["--linear"])
    for bad in bad_runs + (["--init", str(tmp_path)],):
        with pytest.raises(SystemExit):
            probe.main(bad)
