"""GQA questions + scene graphs -> grounded rows (docs/data.md, docs/spec.md §2).

Input (the official release, https://cs.stanford.edu/people/dorarad/gqa/): a questions JSON
{question_id: {"imageId", "question", "answer", "fullAnswer", "semanticStr", "annotations": {"question" |
"answer" | "fullAnswer": {span: "obj_id[,obj_id]"}}, "semantic": [{"argument": "name (obj_id)", ...}], ...}},
the scene graphs JSON {image_id: {"objects": {obj_id: {"x", "y", "w", "h", ...}}}} and the images <imageId>.jpg.
A box is [x, y, x + w, y + h]; images are referenced (relative path), not copied.

Recipes:

* `sayo`, rule by rule as the SAYO authors prepare it (Cratileo/Sayo, utils/pre_processor_data.py): questions
  in file order (they read train_all_questions_0.json); the region is ONE object, the id captured by their
  regular expression SAYO_OBJECT_RE on `semanticStr` (first match; a question without one is skipped); answer =
  `fullAnswer`, short_answer = `answer`; id = the question id. Their script stops when the whole mix passes
  20,000 rows (see sayo_mix.py). Where their script would crash (an object id absent from the scene graph, a
  missing image entry) the question is skipped and counted.
* `union`: this project's earlier recipe: the objects of the first non-empty annotation (answer, question,
  fullAnswer; else the last `semantic` step naming ids), all of them as the region, the short answer, ids
  "gqa-<question_id>", questions sorted by id, optionally a seeded sample of max_rows.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

RECIPES = ("sayo", "union")
# The authors' pattern: a "(<digits>)" with no further "(...)" group before the end of semanticStr.
SAYO_OBJECT_RE = re.compile(r"\((?P<number>\d+)\)(?![^(]*\([^()]*\)[^)]*$)")
_SEMANTIC_IDS = re.compile(r"\(([0-9][0-9,\s]*)\)")


def object_box(obj: dict) -> list[float]:
    """A scene-graph object's [x, y, x + w, y + h]."""
    return [float(obj["x"]), float(obj["y"]), float(obj["x"] + obj["w"]), float(obj["y"] + obj["h"])]


def image_path(images_dir: Path, out_dir: Path, image_id: Any) -> str:
    """The GQA image of `image_id`, relative to the output folder (the JSONL's folder)."""
    return os.path.relpath(Path(images_dir).resolve() / f"{image_id}.jpg", Path(out_dir).resolve())


# ---------------------------------------------------------------- sayo

def sayo_object_id(semantic_str: Any) -> str | None:
    """The object id the authors' expression picks from `semanticStr`, or None."""
    m = SAYO_OBJECT_RE.search(str(semantic_str or ""))
    return m.group("number") if m else None


def sayo_rows(questions: dict, scene_graphs: dict, images_dir: Path, out_dir: Path,
              skipped: dict[str, int] | None = None) -> Iterator[dict]:
    """The authors' rows, lazily in question-file order; `skipped` counts questions left out, by reason."""
    skipped = {} if skipped is None else skipped
    for qid, q in questions.items():
        obj_id = sayo_object_id(q.get("semanticStr"))
        obj = ((scene_graphs.get(str(q.get("imageId"))) or {}).get("objects") or {}).get(obj_id)
        reason = ("no object id in semanticStr" if obj_id is None else
                  "object not in the scene graph" if obj is None else None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield {"id": str(qid), "image": image_path(images_dir, out_dir, q["imageId"]), "question": q.get("question"),
               "answer": q.get("fullAnswer"), "short_answer": q.get("answer"), "boxes": [object_box(obj)]}


# ---------------------------------------------------------------- union

def _split_ids(value: Any) -> list[str]:
    """Object ids from an annotation value ("123" or "123,456")."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


def referred_object_ids(question: dict) -> list[str]:
    """Ids of the objects a question refers to (the `union` order above), first-seen order."""
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
    return [object_box(o) for o in (objects.get(i) for i in object_ids) if o is not None]


def union_rows(questions: dict, scene_graphs: dict, images_dir: Path, out_dir: Path,
               max_rows: int | None = None, seed: int = 0) -> list[dict]:
    """Rows for every usable question (or a seeded sample of max_rows of them)."""
    rows = []
    for qid in sorted(questions):
        q = questions[qid]
        graph = scene_graphs.get(str(q.get("imageId")))
        boxes = object_boxes(referred_object_ids(q), graph) if graph else []
        if not boxes:
            continue
        rows.append({"id": f"gqa-{qid}", "image": image_path(images_dir, out_dir, q["imageId"]),
                     "question": q.get("question"), "answer": q.get("answer"), "boxes": boxes})
    if max_rows is not None and max_rows < len(rows):
        rows = random.Random(seed).sample(rows, max_rows)
    return rows


def read_json(path: Path, what: str) -> dict:
    """A GQA JSON file as a dict; errors name the file."""
    from megatron_sayo.formats.jsonfiles import read_json as read

    data = read(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def prepare(questions_path: Path, scene_graphs_path: Path, images_dir: Path, out: Path, recipe: str = "sayo",
            max_rows: int | None = None, seed: int = 0) -> dict:
    """Write the recipe's rows to out/data.jsonl (a new folder, published atomically)."""
    from megatron_sayo.data.output_dir import new_dataset_dir, write_rows

    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {RECIPES}, got {recipe!r}")
    questions = read_json(questions_path, "GQA questions")
    graphs = read_json(scene_graphs_path, "GQA scene graphs")
    skipped: dict[str, int] = {}
    with new_dataset_dir(out) as tmp:
        if recipe == "sayo":
            rows = []
            for row in sayo_rows(questions, graphs, images_dir, tmp, skipped):
                if max_rows is not None and len(rows) >= max_rows:
                    break
                rows.append(row)
        else:
            rows = union_rows(questions, graphs, images_dir, tmp, max_rows, seed)
        written, dropped = write_rows(rows, tmp, out)
    return {"read": len(questions), "written": written, "dropped": dropped, "skipped": skipped}
