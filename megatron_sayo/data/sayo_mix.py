"""The SAYO paper's training mix, as the authors' script builds it (Cratileo/Sayo, utils/pre_processor_data.py).

ReFocus `sayo` rows first (refocus.py: the 25 % test side of train_test_split(seed=42), boxed rows, first box),
then GQA `sayo` rows (gqa.py: one object from semanticStr, fullAnswer with the short answer beside it) in
question-file order, until the mix holds more than 20,000 rows: their loop appends a row and then stops when
`len(rows) > 20000`, so the file has SAYO_MIX_ROWS = 20,001 rows. Rows our validator rejects (their script keeps
them: it never checks a box) are dropped after the cut and reported, so the question set is theirs.
Train with `reward.accuracy_target: short_answer` to match GQA's short answers (docs/data.md).
"""

from __future__ import annotations

from pathlib import Path

from megatron_sayo.data import gqa, refocus
from megatron_sayo.data.output_dir import new_dataset_dir, write_rows

SAYO_MIX_ROWS = 20_001


def prepare(refocus_files: list[Path], questions_path: Path, scene_graphs_path: Path, images_dir: Path,
            out: Path, max_rows: int = SAYO_MIX_ROWS, on_error: str = "stop") -> dict:
    """Write the mix to out/data.jsonl (+ out/images/ for ReFocus); returns counts per source.

    An off-schema GQA question or object (gqa.py) stops the run (GQASchemaError, nothing published) or, with
    on_error "skip", is left out, logged and counted in `gqa_skipped`."""
    if max_rows < 1:
        raise ValueError(f"--max-rows must be >= 1, got {max_rows}")
    gqa.check_on_error(on_error)
    questions = gqa.read_json(questions_path, "GQA questions")
    graphs = gqa.read_json(scene_graphs_path, "GQA scene graphs")
    skipped: dict[str, int] = {}
    with new_dataset_dir(out) as tmp:
        (tmp / "images").mkdir()
        rows, no_box = refocus.sayo_rows(refocus_files, tmp)
        rows = rows[:max_rows]
        n_refocus = len(rows)
        for row in gqa.sayo_rows(questions, graphs, images_dir, tmp, skipped, on_error, str(questions_path)):
            if len(rows) >= max_rows:
                break
            rows.append(row)
        written, dropped = write_rows(rows, tmp, out)
    return {"refocus": n_refocus, "gqa": len(rows) - n_refocus, "refocus_no_box": no_box, "gqa_skipped": skipped,
            "written": written, "dropped": dropped}
