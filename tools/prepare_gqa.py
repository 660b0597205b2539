#!/usr/bin/env python
"""GQA questions + scene graphs -> grounded JSONL (docs/data.md; logic: megatron_sayo/data/gqa.py).

    python tools/prepare_gqa.py --questions train_all_questions_0.json --scene-graphs train_sceneGraphs.json \\
        --images GQA/images --out DIR [--recipe sayo|union] [--max-rows N] [--seed 0] [--on-error stop|skip]

`sayo` (default): one object from semanticStr as the region, fullAnswer as the answer and the short answer in
`short_answer`, question-file order, the first N usable questions with --max-rows. `union`: all annotated
objects, the short answer, a seeded sample of N with --max-rows. Images are referenced, not copied.

A question or the scene-graph object it refers to that is off the GQA schema (an object without `w`, a `"w": "20"`,
...) is named with its question id, image, object and field: --on-error stop (default) ends the run with that
error and exit 2, nothing written; --on-error skip leaves the question out, logs it and counts it in the summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.data.gqa import ON_ERROR, RECIPES, prepare, run_prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, type=Path,
                        help="GQA questions JSON (e.g. train_balanced_questions.json)")
    parser.add_argument("--scene-graphs", required=True, type=Path, help="GQA scene graphs JSON (object boxes)")
    parser.add_argument("--images", required=True, type=Path, help="folder with <imageId>.jpg")
    parser.add_argument("--out", required=True, type=Path, help="new output folder")
    parser.add_argument("--recipe", choices=RECIPES, default="sayo",
                        help="'sayo': the authors' subset (one object per question); 'union': this project's "
                             "earlier recipe")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="--recipe union: a seeded sample of at most this many rows (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="--recipe union: sampling seed for --max-rows")
    parser.add_argument("--on-error", choices=ON_ERROR, default="stop",
                        help="an off-schema question or scene-graph object: stop with its error (exit 2, nothing "
                             "written) or skip the question (logged, counted in the summary)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = run_prepare(prepare, args.questions, args.scene_graphs, args.images, args.out, args.recipe,
                       args.max_rows, args.seed, args.on_error)
    if done is None:
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(done["skipped"].items())) or "none"
    print(f"{args.out / 'data.jsonl'}: {done['read']} question(s) read, {done['written']} row(s) written, "
          f"{done['dropped']} dropped by validation; skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
