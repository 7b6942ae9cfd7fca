"""The model embedded in the package: Harmon-Shapes, a tiny Harmon trained on synthetic coloured shapes.

It lets `harmon-hf generate "a red circle"` and `harmon-hf caption` run on a fresh install with no download; see
model_cards/harmon-shapes.md for how it was trained and how well it does.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "harmon-shapes"


def default_model_path() -> Path:
    """Folder of the embedded default model (a `HarmonPipeline` folder)."""
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall harmon-hf or pass --model DIR"
        )
    return DEFAULT_MODEL_DIR
