#!/usr/bin/env python
"""GQA questions + scene graphs -> grounded JSONL (docs/data.md; logic: megatron_sayo/data/gqa.py).

    python tools/prepare_gqa.py --questions train_all_questions_0.json --scene-graphs train_sceneGraphs.json \\
        --images GQA/images --out DIR [--recipe sayo|union] [--max-rows N] [--seed 0]

`sayo` (default): one object from semanticStr as the region, fullAnswer as the answer and the short answer in
`short_answer`, question-file order, the first N usable questions with --max-rows. `union`: all annotated
objects, the short answer, a seeded sample of N with --max-rows. Images are referenced, not copied.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.data.gqa import RECIPES, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, type=Path)
    parser.add_argument("--scene-graphs", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="folder with <imageId>.jpg")
    parser.add_argument("--out", required=True, type=Path, help="new output folder")
    parser.add_argument("--recipe", choices=RECIPES, default="sayo")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="--recipe union: sampling seed for --max-rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        done = prepare(args.questions, args.scene_graphs, args.images, args.out, args.recipe, args.max_rows,
                       args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(done["skipped"].items())) or "none"
    print(f"{args.out / 'data.jsonl'}: {done['read']} question(s) read, {done['written']} row(s) written, "
          f"{done['dropped']} dropped by validation; skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
