"""Check ShapesEval on ground truth: the scorer must give 1.0 to exact renders of held-out prompts, 0.0 to the same
pictures under perturbed prompts, and the rule-based answerer must answer every question right.

    python examples/shapes/validate_eval.py --n 200
"""

from __future__ import annotations

import argparse
import json

from harmon_hf.shapes.data import ShapesWorld
from harmon_hf.shapes.eval import validate_scorer


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run `validate_scorer`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="test scenes per kind")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args(argv)
    report = validate_scorer(args.n, args.seed, ShapesWorld(resolution=args.resolution))
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
