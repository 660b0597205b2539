#!/usr/bin/env python
"""ReFocus parquet shards -> grounded JSONL (docs/data.md; logic: megatron_sayo/data/refocus.py).

    python tools/prepare_refocus.py data/train-0000*-of-00003.parquet --out DIR [--recipe sayo]
    python tools/prepare_refocus.py SHARDS... --out DIR --recipe fraction [--fraction 0.25] [--seed 0]

`sayo` (default): the SAYO authors' subset: train_test_split(test_size=0.25, seed=42)["test"] of the train
split, rows without a box dropped, first box. `fraction`: a seeded fraction of the boxed rows. Output:
DIR/data.jsonl and DIR/images/ (a new folder, written atomically; an existing DIR is refused).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.data.refocus import RECIPES, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="ReFocus_Data parquet shards")
    parser.add_argument("--out", required=True, type=Path, help="new output folder")
    parser.add_argument("--recipe", choices=RECIPES, default="sayo",
                        help="'sayo': the authors' subset; 'fraction': this project's earlier seeded share of the rows")
    parser.add_argument("--fraction", type=float, default=0.25, help="--recipe fraction: share of boxed rows")
    parser.add_argument("--seed", type=int, default=0, help="--recipe fraction: sampling seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        done = prepare(args.files, args.out, args.recipe, args.fraction, args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out / 'data.jsonl'}: {done['written']} row(s) written, {done['dropped']} dropped by validation, "
          f"{done['no_box']} without a focus box")
    return 0


if __name__ == "__main__":
    sys.exit(main())
