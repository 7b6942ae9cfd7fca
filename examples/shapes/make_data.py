"""Write Harmon-Shapes datasets (and the tiny tokenizer) for training and evaluation.

    python examples/shapes/make_data.py --out /tmp/harmon-shapes-data --train 20000 --test 600

Creates OUT/train and OUT/test (see `harmon_hf.shapes.data.write_dataset` for the files: images/, captions.json,
data_info.json, metadata.jsonl, conversations.json, conversations_multiturn.json, world.json) and OUT/tokenizer
(`AutoTokenizer.from_pretrained(OUT/tokenizer)`). The train split never contains the held-out colour/shape
combinations or pair layouts; the test split is drawn from a different seed stream. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harmon_hf.shapes.data import LAYOUTS, ShapesWorld, write_dataset
from harmon_hf.shapes.tokenizer import save_tokenizer


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and write the splits."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=20000, help="train pictures")
    parser.add_argument("--test", type=int, default=600, help="test pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="slots", help="ShapesWorld.layout (the shipped model: slots)"
    )
    parser.add_argument("--vocab-size", type=int, default=500, help="tokenizer size incl. special tokens")
    parser.add_argument("--no-tokenizer", action="store_true")
    args = parser.parse_args(argv)
    world = ShapesWorld(resolution=args.resolution, layout=args.layout)
    out = Path(args.out)
    for split, n in (("train", args.train), ("test", args.test)):
        if n <= 0:
            continue
        start = time.perf_counter()
        summary = write_dataset(out / split, n, split=split, seed=args.seed, world=world)
        print(
            f"{split}: {summary['num_images']} pictures, {summary['num_questions']} questions, kinds {summary['kinds']}, "
            f"{summary['novel']} with held-out material ({time.perf_counter() - start:.1f}s) -> {out / split}"
        )
    if not args.no_tokenizer:
        path = save_tokenizer(out / "tokenizer", args.vocab_size, world)
        print(f"tokenizer -> {path}")


if __name__ == "__main__":
    main()
