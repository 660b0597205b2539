#!/usr/bin/env python
"""The SAYO paper's training mix from ReFocus and GQA, as the authors build it (logic: megatron_sayo/data/sayo_mix.py).

    python tools/prepare_sayo_mix.py --refocus ReFocus_Data/data/train-0000*-of-00003.parquet \\
        --gqa-questions GQA/questions/train_all_questions/train_all_questions_0.json \\
        --gqa-scene-graphs GQA/sceneGraphs/train_sceneGraphs.json --gqa-images GQA/images --out DIR

ReFocus `sayo` rows, then GQA `sayo` rows until 20,001 rows (their loop's stop). Output: DIR/data.jsonl with
`short_answer` on GQA rows (train with reward.accuracy_target=short_answer), DIR/images/ for ReFocus.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.data.gqa import ON_ERROR, run_prepare  # noqa: E402
from megatron_sayo.data.sayo_mix import SAYO_MIX_ROWS, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refocus", nargs="+", required=True, type=Path, help="ReFocus_Data train-*.parquet")
    parser.add_argument("--gqa-questions", required=True, type=Path, help="GQA questions JSON")
    parser.add_argument("--gqa-scene-graphs", required=True, type=Path, help="GQA scene graphs JSON (object boxes)")
    parser.add_argument("--gqa-images", required=True, type=Path, help="folder with GQA's <imageId>.jpg")
    parser.add_argument("--out", required=True, type=Path, help="new output folder")
    parser.add_argument("--max-rows", type=int, default=SAYO_MIX_ROWS, help="rows in the mix (the authors': 20001)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="stop",
                        help="an off-schema GQA question or scene-graph object: stop with its error (exit 2, "
                             "nothing written) or skip the question (logged, counted in the summary)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = run_prepare(prepare, args.refocus, args.gqa_questions, args.gqa_scene_graphs, args.gqa_images, args.out,
                       args.max_rows, args.on_error)
    if done is None:
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(done["gqa_skipped"].items())) or "none"
    print(f"{args.out / 'data.jsonl'}: {done['written']} row(s) written ({done['refocus']} ReFocus + "
          f"{done['gqa']} GQA), {done['dropped']} dropped by validation; GQA questions skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
