"""Convert downloaded GQA questions + scene graphs into our grounded JSONL (docs/spec.md §2).

    python tools/prepare_gqa.py --questions train_balanced_questions.json \\
        --scene-graphs train_sceneGraphs.json --images GQA/images --out DIR [--max-rows N] [--seed 0]

Recipe (paper): GQA questions whose object box comes from the scene graph.

Assumed input (the official GQA release, https://cs.stanford.edu/people/dorarad/gqa/):

* questions JSON: {question_id: {"imageId": str, "question": str, "answer": str,
  "fullAnswer": str, "annotations": {"question": {span: obj_id}, "answer": {span: obj_id},
  "fullAnswer": {span: obj_id}}, "semantic": [{"operation": str, "argument": "name (obj_id)",
  "dependencies": [int]}], ...}}; a span is "3" or "3:5" (token indices), an
  annotation value may list several ids separated by commas;
* scene graphs JSON: {image_id: {"width": int, "height": int, "objects": {obj_id:
  {"name": str, "x": int, "y": int, "w": int, "h": int, ...}}}};
* images folder: <imageId>.jpg.

The object(s) a question refers to: the ids of the first non-empty annotation
field in the order answer, question, fullAnswer (the answer object is where the
evidence is; otherwise the objects the question names); failing those, the ids
in the `semantic` program's arguments "name (id)", taken from the last step
that names any. Each object gives one box [x, y, x + w, y + h]; several form one
region (union). Questions without such an object in the scene graph are skipped.

Output: DIR/data.jsonl with `image` the path of the GQA image relative to DIR
(images are not copied), id "gqa-<question_id>". `--max-rows N` draws N of the
usable questions (sorted by id) with random.Random(seed). Every output row goes
through the shared row validator; rows that fail are dropped and reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

from megatron_sayo.data.grounded import write_jsonl

log = logging.getLogger("prepare_gqa")
_SEMANTIC_IDS = re.compile(r"\(([0-9][0-9,\s]*)\)")


def _split_ids(value: Any) -> list[str]:
    """Object ids from an annotation value ("123" or "123,456")."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


def referred_object_ids(question: dict) -> list[str]:
    """Ids of the objects a GQA question refers to (see module docstring for the order), first-seen order."""
    annotations = question.get("annotations") or {}
    for field in ("answer", "question", "fullAnswer"):
        spans = annotations.get(field) or {}
        ids = [i for value in spans.values() for i in _split_ids(value)]
        if ids:
            return list(dict.fromkeys(ids))
    for step in reversed(question.get("semantic") or []):
        ids = [i for m in _SEMANTIC_IDS.findall(str(step.get("argument", ""))) for i in _split_ids(m)]
        if ids:
            return list(dict.fromkeys(ids))
    return []


def object_boxes(object_ids: list[str], scene_graph: dict) -> list[list[float]]:
    """[x, y, x + w, y + h] for each id present in the scene graph's objects."""
    objects = scene_graph.get("objects") or {}
    return [[float(o["x"]), float(o["y"]), float(o["x"] + o["w"]), float(o["y"] + o["h"])]
            for o in (objects.get(i) for i in object_ids) if o is not None]


def build_rows(questions: dict, scene_graphs: dict, images_dir: Path, out_dir: Path,
               max_rows: int | None = None, seed: int = 0) -> list[dict]:
    """Our rows for every usable question (or a seeded sample of max_rows of them)."""
    rows = []
    for qid in sorted(questions):
        q = questions[qid]
        graph = scene_graphs.get(str(q.get("imageId")))
        boxes = object_boxes(referred_object_ids(q), graph) if graph else []
        if not boxes:
            continue
        image = os.path.relpath(images_dir / f"{q['imageId']}.jpg", out_dir)
        rows.append({"id": f"gqa-{qid}", "image": image, "question": q.get("question"),
                     "answer": q.get("answer"), "boxes": boxes})
    if max_rows is not None and max_rows < len(rows):
        rows = random.Random(seed).sample(rows, max_rows)
    return rows


def convert(questions_path: Path, scene_graphs_path: Path, images_dir: Path, out_dir: Path,
            max_rows: int | None = None, seed: int = 0) -> tuple[int, int, int]:
    """Write DIR/data.jsonl; return (questions read, rows written, rows dropped by validation)."""
    questions = json.loads(Path(questions_path).read_text(encoding="utf-8"))
    scene_graphs = json.loads(Path(scene_graphs_path).read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_rows(questions, scene_graphs, Path(images_dir).resolve(), out_dir.resolve(), max_rows, seed)
    errors = write_jsonl(rows, out_dir / "data.jsonl")
    for err in errors:
        log.warning("dropped: %s", err)
    return len(questions), len(rows) - len(errors), len(errors)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="GQA questions + scene graphs -> grounded JSONL")
    parser.add_argument("--questions", required=True, type=Path)
    parser.add_argument("--scene-graphs", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="folder with <imageId>.jpg")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-rows", type=int, default=None, help="seeded random sample of usable questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    read, written, dropped = convert(args.questions, args.scene_graphs, args.images, args.out,
                                     args.max_rows, args.seed)
    print(f"{args.out / 'data.jsonl'}: {read} question(s) read, {written} row(s) written, "
          f"{dropped} dropped by validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
