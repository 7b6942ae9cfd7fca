"""The upstream checkpoint converter: the CLI (`harmon-hf convert`, `python -m harmon_hf.convert`), loading its output
in a fresh interpreter, the `<image>` token, `--dtype`, `--overwrite`, and bad inputs that must write nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixture_utils import FIXTURE_DIR, assert_fixture_close, fixture_json, load_tensors, requires_fixture
from safetensors import safe_open

from harmon_hf import HarmonForConditionalGeneration, HarmonProcessor
from harmon_hf.convert import convert
from harmon_hf.convert_vae import CheckpointError

pytestmark = requires_fixture

CHECKPOINT = FIXTURE_DIR / "harmon.pth"
VAE = FIXTURE_DIR / "kl16.ckpt"
LLM = FIXTURE_DIR / "llm"
UND = "understanding.safetensors"


def cli_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=cwd, timeout=300)


def harmon_cli() -> list[str]:
    """The `harmon-hf` console script next to this interpreter (else the module entry point)."""
    script = Path(sys.executable).with_name("harmon-hf")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "harmon_hf.cli"]


def convert_args(output: Path, checkpoint: Path = CHECKPOINT, vae: Path = VAE, llm: Path = LLM) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--vae", str(vae), "--llm", str(llm), "--output", str(output)]


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def upstream_state() -> dict[str, torch.Tensor]:
    return dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))


@pytest.fixture(scope="session")
def cli_output(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "harmon-tiny"
    return out, run([*harmon_cli(), "convert", *convert_args(out)])


# ---------------------------------------------------------------------------------------------------------------
# the two entry points
# ---------------------------------------------------------------------------------------------------------------
def test_cli_convert_writes_a_pipeline_folder(cli_output) -> None:
    out, proc = cli_output
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout  # says what it wrote
    for name in ("model", "processor", "scheduler", "model_index.json"):
        assert name in proc.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "HarmonPipeline"
    assert index["model"] == ["harmon_hf.modeling_harmon", "HarmonForConditionalGeneration"]
    assert index["processor"] == ["harmon_hf.processing_harmon", "HarmonProcessor"]
    assert index["scheduler"] == ["harmon_hf.scheduling_harmon", "HarmonDDPMScheduler"]
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    assert (out / "processor" / "tokenizer.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    # readable by others as a plain mkdir/open would make it (umask 022 in the test environment at most)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((out / "model" / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask


def test_module_entry_point_gives_identical_files(cli_output, tmp_path: Path) -> None:
    """`python -m harmon_hf.convert` and converting twice give byte-identical folders (paths do not leak in)."""
    out, _ = cli_output
    llm_copy = tmp_path / "elsewhere" / "Qwen-copy"
    shutil.copytree(LLM, llm_copy)
    second = tmp_path / "again"
    proc = run([sys.executable, "-m", "harmon_hf.convert", *convert_args(second, llm=llm_copy)])
    assert proc.returncode == 0, proc.stderr
    first_files, second_files = folder_files(out), folder_files(second)
    assert set(first_files) == set(second_files)
    differing = [name for name in first_files if first_files[name] != second_files[name]]
    # conversion.json records the input file names, which differ here on purpose (llm/ vs Qwen-copy/)
    assert differing == ["model/conversion.json"]


FRESH_LOAD = r"""
import sys
import torch
from safetensors.torch import load_file, save_file
import harmon_hf
from harmon_hf import HarmonForConditionalGeneration, HarmonPipeline, HarmonProcessor

folder, fixture, result = sys.argv[1:4]
pipe = HarmonPipeline.from_pretrained(folder)
model = HarmonForConditionalGeneration.from_pretrained(folder, subfolder="model").eval()
processor = HarmonProcessor.from_pretrained(folder, subfolder="processor")
und = load_file(fixture + "/understanding.safetensors")
with torch.no_grad():
    logits = model(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits
    pipe_logits = pipe.model(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits
ids = processor(text="<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
                images=[torch.zeros(3, 64, 64)], return_tensors="pt")["input_ids"]
image = pipe("a red cube", num_inference_steps=2, num_diffusion_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
save_file({"logits": logits, "pipe_logits": pipe_logits, "ids": ids}, result)
print(type(pipe.scheduler).__name__, type(pipe.processor).__name__, image.size)
"""


def test_output_loads_in_a_fresh_interpreter(cli_output, tmp_path: Path) -> None:
    out, _ = cli_output
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    result = tmp_path / "result.safetensors"
    proc = run([sys.executable, str(script), str(out), str(FIXTURE_DIR), str(result)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HarmonDDPMScheduler HarmonProcessor (64, 64)" in proc.stdout
    with safe_open(str(result), "pt") as f:
        assert_fixture_close(f.get_tensor("logits"), UND, "logits")
        assert_fixture_close(f.get_tensor("pipe_logits"), UND, "logits")
        assert_fixture_close(f.get_tensor("ids"), UND, "input_ids")


def test_image_token_is_added_as_upstream(cli_output) -> None:
    out, _ = cli_output
    facts = fixture_json()["tokenizer"]
    processor = HarmonProcessor.from_pretrained(out, subfolder="processor")
    tokenizer = processor.tokenizer
    assert facts["len_llm_tokenizer"] == 500 and facts["image_token_id"] == 500
    assert len(tokenizer) == facts["len_with_image"]
    assert tokenizer.convert_tokens_to_ids(facts["image_token"]) == facts["image_token_id"]
    assert processor.image_token_id == facts["image_token_id"]
    assert tokenizer.decode([facts["image_token_id"]]) == facts["image_token"]
    assert (tokenizer.eos_token, tokenizer.pad_token) == (facts["eos_token"], facts["pad_token"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["image_token_id"] == facts["image_token_id"]
    assert config["text_config"]["vocab_size"] == facts["llm_vocab_size"]  # nothing resized
    # `<image>` is one special token: it never merges with text around it
    ids = tokenizer("x<image><image>\n", add_special_tokens=False)["input_ids"]
    assert ids.count(facts["image_token_id"]) == 2
    generation = json.loads((out / "model" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == facts["im_end_id"] and generation["pad_token_id"] == facts["endoftext_id"]


# ---------------------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------------------
def test_bfloat16_output_keeps_the_vae_in_float32(tmp_path: Path) -> None:
    out = convert(CHECKPOINT, VAE, LLM, tmp_path / "bf16", dtype="bfloat16", verbose=False)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert {d for k, d in dtypes.items() if k.startswith("model.vae.")} == {"F32"}
    assert {d for k, d in dtypes.items() if not k.startswith("model.vae.")} == {"BF16"}
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    model = HarmonForConditionalGeneration.from_pretrained(out, subfolder="model")
    assert model.dtype == torch.bfloat16 and model.model.vae.dtype == torch.float32


def main_in_process(entry: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`harmon-hf convert ARGV` (entry "cli") or `python -m harmon_hf.convert ARGV` (entry "module") in this
    process (the same code as the console scripts, without an interpreter start) -> (status, stdout, stderr)."""
    from harmon_hf import cli
    from harmon_hf import convert as convert_module

    capsys.readouterr()  # drop what earlier calls printed
    try:
        rc = cli.main(["convert", *argv]) if entry == "cli" else convert_module.main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_existing_output_needs_overwrite(tmp_path: Path, capsys) -> None:
    out = convert(CHECKPOINT, VAE, LLM, tmp_path / "model", verbose=False)
    before = folder_files(out)
    (out / "model" / "marker.txt").write_text("keep me unless overwritten")
    rc, _, err = main_in_process("module", convert_args(out), capsys)
    assert rc != 0 and err.strip().count("\n") == 0
    assert "already holds a model" in err and "--overwrite" in err
    assert (out / "model" / "marker.txt").is_file()
    rc, stdout, err = main_in_process("module", [*convert_args(out), "--overwrite"], capsys)
    assert rc == 0, err
    assert f"wrote {out}" in stdout
    assert folder_files(out) == before  # replaced as a whole (the marker is gone)
    # a folder that holds other things is never replaced, even with --overwrite
    other = tmp_path / "my-files"
    other.mkdir()
    (other / "notes.txt").write_text("not a model")
    for extra in ([], ["--overwrite"]):
        rc, _, err = main_in_process("module", [*convert_args(other), *extra], capsys)
        assert rc != 0 and "holds no model" in err
        assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(CHECKPOINT, VAE, LLM, empty, verbose=False)
    assert (empty / "model_index.json").is_file()


def test_checkpoint_without_lm_head_converts(tmp_path: Path) -> None:
    state = upstream_state()
    state.pop("llm.lm_head.weight")
    path = tmp_path / "no_lm_head.pth"
    torch.save(state, path)
    out = convert(path, VAE, LLM, tmp_path / "out", verbose=False)
    model = HarmonForConditionalGeneration.from_pretrained(out, subfolder="model").eval()
    assert model.config.tie_word_embeddings
    und = load_tensors(UND)
    with torch.no_grad():
        assert_fixture_close(model(input_ids=und["input_ids"], pixel_values=und["pixel_values"]).logits, UND, "logits")


def test_export_back_to_upstream_restores_the_checkpoints(cli_output) -> None:
    """`upstream_state_dict` (used by benchmarks/bench_convert.py to fabricate checkpoints) inverts the conversion."""
    from harmon_hf.convert import upstream_state_dict
    from harmon_hf.convert_vae import load_upstream_vae

    out, _ = cli_output
    model = HarmonForConditionalGeneration.from_pretrained(out, subfolder="model")
    harmon, vae = upstream_state_dict(model.state_dict())
    original = {k: v for k, v in upstream_state().items() if not k.startswith("mar.class_emb.")}
    assert harmon.keys() == original.keys()
    assert all(torch.equal(harmon[k], original[k]) for k in original)
    original_vae = load_upstream_vae(VAE)
    assert vae.keys() == original_vae.keys()
    assert all(torch.equal(vae[k], original_vae[k]) for k in original_vae)


def test_untied_lm_head_is_kept(tmp_path: Path) -> None:
    state = upstream_state()
    state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"].clone() * 0.5
    path = tmp_path / "untied.pth"
    torch.save(state, path)
    out = convert(path, VAE, LLM, tmp_path / "out", verbose=False)
    model = HarmonForConditionalGeneration.from_pretrained(out, subfolder="model")
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, state["llm.lm_head.weight"], atol=0, rtol=0)
    torch.testing.assert_close(model.get_input_embeddings().weight, state["llm.model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: a one-line error naming the problem, nothing written
# ---------------------------------------------------------------------------------------------------------------
def _edited(tmp_path: Path, name: str, edit) -> Path:
    state = upstream_state()
    edit(state)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path


def _other_llm(tmp_path: Path, **changes) -> Path:
    llm = tmp_path / "other-llm"
    shutil.copytree(LLM, llm)
    config = json.loads((llm / "config.json").read_text())
    config.update(changes)
    (llm / "config.json").write_text(json.dumps(config))
    return llm


def _other_vae(tmp_path: Path, latent_channels: int) -> Path:
    state = dict(torch.load(VAE, map_location="cpu", weights_only=True)["model"])
    width = state["encoder.conv_out.weight"].shape[1]
    dec_width = state["decoder.conv_in.weight"].shape[0]
    c = latent_channels
    state["encoder.conv_out.weight"], state["encoder.conv_out.bias"] = (
        torch.zeros(2 * c, width, 3, 3),
        torch.zeros(2 * c),
    )
    state["quant_conv.weight"], state["quant_conv.bias"] = torch.zeros(2 * c, 2 * c, 1, 1), torch.zeros(2 * c)
    state["post_quant_conv.weight"], state["post_quant_conv.bias"] = torch.zeros(c, c, 1, 1), torch.zeros(c)
    state["decoder.conv_in.weight"] = torch.zeros(dec_width, c, 3, 3)
    path = tmp_path / f"kl{c}.ckpt"
    torch.save({"model": state}, path)
    return path


BAD_INPUTS = {
    "missing key": (
        lambda tmp: {"checkpoint": _edited(tmp, "missing", lambda s: s.pop("mar.z_proj_ln.weight"))},
        r"missing \['model\.mar\.z_proj_ln\.weight'\]",
    ),
    "missing LLM key": (
        lambda tmp: {"checkpoint": _edited(tmp, "missing", lambda s: s.pop("llm.model.layers.1.mlp.up_proj.weight"))},
        r"missing \['model\.language_model\.layers\.1\.mlp\.up_proj\.weight'\]",
    ),
    "unexpected key": (
        lambda tmp: {"checkpoint": _edited(tmp, "extra", lambda s: s.update({"mar.extra.weight": torch.zeros(3)}))},
        r"unexpected \['model\.mar\.extra\.weight'\]",
    ),
    "unknown prefix": (
        lambda tmp: {"checkpoint": _edited(tmp, "foreign", lambda s: s.update({"foo.bar": torch.zeros(3)}))},
        r"unexpected keys in the Harmon checkpoint: foo\.bar",
    ),
    "shape mismatch": (
        lambda tmp: {
            "checkpoint": _edited(tmp, "shape", lambda s: s.update({"mar.decoder_norm.weight": torch.zeros(31)}))
        },
        r"shape mismatch for model\.mar\.decoder_norm\.weight: checkpoint \(31,\), model \(32,\)",
    ),
    "VAE of another model": (
        lambda tmp: {"vae": _other_vae(tmp, 8)},
        r"16-dim tokens.*8 latent channels.*--vae checkpoint does not belong",
    ),
    "LLM of another size": (
        lambda tmp: {"llm": _other_llm(tmp, hidden_size=128)},
        r"--llm config \(vocab 512, hidden 128, 2 layers\) does not match the checkpoint's LLM \(vocab 512, hidden 64",
    ),
    "LLM with other attention heads": (
        lambda tmp: {"llm": _other_llm(tmp, num_key_value_heads=4)},
        r"shape mismatch for model\.language_model\.layers\.0\.self_attn\.k_proj\.weight",
    ),
    "LLM folder without config": (lambda tmp: {"llm": tmp}, r"is not a Qwen2\.5 directory \(no config\.json\)"),
    "VAE passed as checkpoint": (lambda tmp: {"checkpoint": VAE}, r"kl16\.ckpt is not a Harmon checkpoint"),
    "checkpoint passed as VAE": (lambda tmp: {"vae": CHECKPOINT}, r"harmon\.pth is not a kl16 VAE checkpoint"),
    "missing file": (lambda tmp: {"checkpoint": tmp / "nope.pth"}, r"checkpoint not found: .*nope\.pth"),
    "truncated file": (
        lambda tmp: {"checkpoint": _truncated(tmp)},
        r"cannot read checkpoint .*truncated\.pth \(truncated, or not a torch\.save file\?\)",
    ),
}


def _truncated(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.pth"
    path.write_bytes(CHECKPOINT.read_bytes()[:5000])
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_and_write_nothing(tmp_path: Path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    inputs = {"checkpoint": CHECKPOINT, "vae": VAE, "llm": LLM, **make(tmp_path)}
    workdir = tmp_path / "outputs"
    workdir.mkdir()
    with pytest.raises(CheckpointError, match=message) as info:
        convert(inputs["checkpoint"], inputs["vae"], inputs["llm"], workdir / "out", verbose=False)
    assert "\n" not in str(info.value)
    assert list(workdir.iterdir()) == []  # neither the output nor a temporary folder


@pytest.mark.parametrize("entry", ["cli", "module"])
def test_cli_error_is_one_line_and_writes_nothing(tmp_path: Path, capsys, entry: str) -> None:
    bad = _edited(tmp_path, "missing", lambda s: s.pop("mar.fake_latent"))
    out = tmp_path / "out"
    rc, _, err = main_in_process(entry, convert_args(out, checkpoint=bad), capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model.mar.fake_latent" in lines[0], err
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["missing.pth"]
