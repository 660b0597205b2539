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

Off-schema input (`GQASchemaError`): a question that is not a JSON object, or whose `imageId` (a file-name stem
string), `question`, the recipe's answer fields (strings), `semanticStr` (string when present), `annotations` /
`semantic` (their documented shapes) are not what the release holds; the scene graph of its image that is not an
object or has no `objects` object; a referred object that is not an object, lacks one of `x`, `y`, `w`, `h`, or
has one that is not a finite JSON number (a string such as "20", a boolean, null) or a negative `w` / `h`. Only
what a question uses is checked. The error names the question id, the image, the object (id and JSON) and the
field. `on_error="stop"` (the tools' default) raises it; `"skip"` leaves the question out, logs it with the
reason and counts it in `skipped` under "off-schema <what> field '<field>'".
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECIPES = ("sayo", "union")
# The authors' pattern: a "(<digits>)" with no further "(...)" group before the end of semanticStr.
SAYO_OBJECT_RE = re.compile(r"\((?P<number>\d+)\)(?![^(]*\([^()]*\)[^)]*$)")
_SEMANTIC_IDS = re.compile(r"\(([0-9][0-9,\s]*)\)")


ON_ERROR = ("stop", "skip")
BOX_FIELDS = ("x", "y", "w", "h")


class GQASchemaError(ValueError):
    """A question, or the scene graph / object it refers to, off the GQA release's schema (see the module doc)."""

    def __init__(self, question_id: Any, what: str, where: str, field: str | None, problem: str):
        self.question_id, self.what, self.where, self.field, self.problem = question_id, what, where, field, problem
        self.source = ""          # the questions file, set by the recipe that met it
        super().__init__(str(self))

    @property
    def reason(self) -> str:
        """The key the question is counted under when skipped."""
        return f"off-schema {self.what}" + (f" field {self.field!r}" if self.field else "")

    def detail(self) -> str:
        """Where and what, without the question id."""
        field = f"field {self.field!r} " if self.field else ""
        return f"{self.where}: {field}{self.problem}"

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return f"{prefix}question {self.question_id!r} is off the GQA schema: {self.detail()}"


def _shown(value: Any, limit: int = 160) -> str:
    """A value as JSON, cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _json_type(value: Any) -> str:
    return {bool: "boolean", str: "string", type(None): "null", list: "array", dict: "object", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _require(value: Any, expected: str, question_id: Any, what: str, where: str, field: str | None = None) -> None:
    """GQASchemaError unless `value` is a JSON `expected` ("string", "number", "object", "array")."""
    if _json_type(value) != expected:
        raise GQASchemaError(question_id, what, where, field,
                             f"is {_shown(value, 80)} (a JSON {_json_type(value)}), expected a JSON {expected}")


def object_box(obj: Any, question_id: Any = None, image_id: Any = None, object_id: Any = None) -> list[float]:
    """A scene-graph object's [x, y, x + w, y + h]; GQASchemaError (naming the question, image, object and
    field) for an object that is not a JSON object or whose x, y, w, h are missing, not finite JSON numbers,
    or a negative w / h."""
    where = f"scene graph of image {image_id!r}, object {object_id!r}"
    _require(obj, "object", question_id, "scene-graph object", where)
    where += f" {_shown(obj)}"
    for field in BOX_FIELDS:
        if field not in obj:
            raise GQASchemaError(question_id, "scene-graph object", where, field, "is missing")
        value = obj[field]
        _require(value, "number", question_id, "scene-graph object", where, field)
        if not math.isfinite(value):
            raise GQASchemaError(question_id, "scene-graph object", where, field,
                                 f"is {value}, expected a finite number")
        if field in ("w", "h") and value < 0:
            raise GQASchemaError(question_id, "scene-graph object", where, field, f"is {value}, expected >= 0")
    x, y, w, h = (obj[f] for f in BOX_FIELDS)
    return [float(x), float(y), float(x + w), float(y + h)]


def _check_question(qid: Any, q: Any, string_fields: tuple[str, ...]) -> None:
    """GQASchemaError unless `q` is a JSON object whose imageId names a file and whose `string_fields` (and
    semanticStr, when present) are strings."""
    _require(q, "object", qid, "question", "question")
    for field in ("imageId", *string_fields):
        if field not in q:
            raise GQASchemaError(qid, "question", "question", field, "is missing")
        _require(q[field], "string", qid, "question", "question", field)
    image_id = q["imageId"]
    if image_id in ("", ".", "..") or any(c in image_id for c in "/\\\0"):
        raise GQASchemaError(qid, "question", "question", "imageId",
                             f"is {_shown(image_id, 80)}, expected an image file-name stem (no path)")
    if q.get("semanticStr") is not None:
        _require(q["semanticStr"], "string", qid, "question", "question", "semanticStr")


def _graph_objects(qid: Any, scene_graphs: dict, image_id: str) -> dict | None:
    """The `objects` of the image's scene graph (None when the image has none); GQASchemaError when off-schema."""
    graph = scene_graphs.get(image_id)
    if graph is None:
        return None
    where = f"scene graph of image {image_id!r}"
    _require(graph, "object", qid, "scene graph", where)
    if "objects" not in graph:
        raise GQASchemaError(qid, "scene graph", where, "objects", "is missing")
    _require(graph["objects"], "object", qid, "scene graph", where, "objects")
    return graph["objects"]


def _off_schema(exc: GQASchemaError, on_error: str, skipped: dict[str, int], source: str) -> None:
    """Raise `exc` (on_error "stop") or count and log the skipped question ("skip")."""
    exc.source = source
    if on_error == "stop":
        raise exc
    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
    log.warning("%s: question %r skipped (off the GQA schema, --on-error skip): %s", source or "GQA questions",
                exc.question_id, exc.detail())


def check_on_error(on_error: str) -> None:
    """ValueError unless `on_error` is one of ON_ERROR."""
    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {ON_ERROR}, got {on_error!r}")


def run_prepare(prepare, *args) -> dict | None:
    """A prepare tool's call: prepare(*args)'s summary, or None once its error is printed to stderr (the tool
    exits 2); an off-schema GQA question's error says that --on-error skip would leave it out."""
    try:
        return prepare(*args)
    except GQASchemaError as exc:
        print(f"error: {exc}\nnothing written; --on-error skip leaves such questions out", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return None


def image_path(images_dir: Path, out_dir: Path, image_id: Any) -> str:
    """The GQA image of `image_id`, relative to the output folder (the JSONL's folder)."""
    return os.path.relpath(Path(images_dir).resolve() / f"{image_id}.jpg", Path(out_dir).resolve())


# ---------------------------------------------------------------- sayo

def sayo_object_id(semantic_str: Any) -> str | None:
    """The object id the authors' expression picks from `semanticStr`, or None."""
    m = SAYO_OBJECT_RE.search(str(semantic_str or ""))
    return m.group("number") if m else None


def sayo_rows(questions: dict, scene_graphs: dict, images_dir: Path, out_dir: Path,
              skipped: dict[str, int] | None = None, on_error: str = "stop", source: str = "") -> Iterator[dict]:
    """The authors' rows, lazily in question-file order; `skipped` counts questions left out, by reason.

    An off-schema question or object (module doc) raises GQASchemaError (on_error "stop") or is skipped,
    logged and counted ("skip"); `source` (the questions file) prefixes those messages."""
    check_on_error(on_error)
    skipped = {} if skipped is None else skipped
    for qid, q in questions.items():
        try:
            _check_question(qid, q, ("question", "answer", "fullAnswer"))
            obj_id = sayo_object_id(q.get("semanticStr"))
            objects = (_graph_objects(qid, scene_graphs, q["imageId"]) if obj_id is not None else None) or {}
            reason = ("no object id in semanticStr" if obj_id is None else
                      "object not in the scene graph" if obj_id not in objects else None)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            box = object_box(objects[obj_id], qid, q["imageId"], obj_id)
        except GQASchemaError as exc:
            _off_schema(exc, on_error, skipped, source)
            continue
        yield {"id": str(qid), "image": image_path(images_dir, out_dir, q["imageId"]), "question": q["question"],
               "answer": q["fullAnswer"], "short_answer": q["answer"], "boxes": [box]}


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


def _check_union_fields(qid: Any, q: dict) -> None:
    """GQASchemaError unless `annotations` is {field: {span: ids string}} and `semantic` a list of steps (objects
    whose `argument`, when present, is a string), where present."""
    annotations = q.get("annotations")
    if annotations is not None:
        _require(annotations, "object", qid, "question", "question", "annotations")
        for name, spans in annotations.items():
            if spans is not None:
                _require(spans, "object", qid, "question", "question", f"annotations.{name}")
            for span, ids in (spans or {}).items():
                _require(ids, "string", qid, "question", "question", f"annotations.{name}.{span}")
    semantic = q.get("semantic")
    if semantic is not None:
        _require(semantic, "array", qid, "question", "question", "semantic")
        for i, step in enumerate(semantic):
            _require(step, "object", qid, "question", "question", f"semantic[{i}]")
            if step.get("argument") is not None:
                _require(step["argument"], "string", qid, "question", "question", f"semantic[{i}].argument")


def object_boxes(object_ids: list[str], scene_graph: dict, question_id: Any = None,
                 image_id: Any = None) -> list[list[float]]:
    """[x, y, x + w, y + h] for each id present in the scene graph's objects (GQASchemaError if off-schema)."""
    objects = _graph_objects(question_id, {image_id: scene_graph}, image_id) or {}
    return [object_box(objects[i], question_id, image_id, i) for i in object_ids if i in objects]


def union_rows(questions: dict, scene_graphs: dict, images_dir: Path, out_dir: Path,
               max_rows: int | None = None, seed: int = 0, skipped: dict[str, int] | None = None,
               on_error: str = "stop", source: str = "") -> list[dict]:
    """Rows for every usable question (or a seeded sample of max_rows of them); `skipped` counts the questions
    left out, by reason; off-schema input as in sayo_rows."""
    check_on_error(on_error)
    skipped = {} if skipped is None else skipped
    rows = []
    for qid in sorted(questions):
        q = questions[qid]
        try:
            _check_question(qid, q, ("question", "answer"))
            _check_union_fields(qid, q)
            ids = referred_object_ids(q)
            graph = scene_graphs.get(q["imageId"]) if ids else None
            boxes = object_boxes(ids, graph, qid, q["imageId"]) if graph is not None else []
        except GQASchemaError as exc:
            _off_schema(exc, on_error, skipped, source)
            continue
        if not boxes:
            reason = ("no referred object" if not ids else "image not in the scene graphs" if graph is None else
                      "objects not in the scene graph")
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        rows.append({"id": f"gqa-{qid}", "image": image_path(images_dir, out_dir, q["imageId"]),
                     "question": q["question"], "answer": q["answer"], "boxes": boxes})
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
            max_rows: int | None = None, seed: int = 0, on_error: str = "stop") -> dict:
    """Write the recipe's rows to out/data.jsonl (a new folder, published atomically).

    on_error "stop": the first off-schema question raises GQASchemaError and nothing is published; "skip": it is
    left out, logged and counted in the returned `skipped`."""
    from megatron_sayo.data.output_dir import new_dataset_dir, write_rows

    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {RECIPES}, got {recipe!r}")
    check_on_error(on_error)
    questions = read_json(questions_path, "GQA questions")
    graphs = read_json(scene_graphs_path, "GQA scene graphs")
    skipped: dict[str, int] = {}
    source = str(questions_path)
    with new_dataset_dir(out) as tmp:
        if recipe == "sayo":
            rows = []
            for row in sayo_rows(questions, graphs, images_dir, tmp, skipped, on_error, source):
                if max_rows is not None and len(rows) >= max_rows:
                    break
                rows.append(row)
        else:
            rows = union_rows(questions, graphs, images_dir, tmp, max_rows, seed, skipped, on_error, source)
        written, dropped = write_rows(rows, tmp, out)
    return {"read": len(questions), "written": written, "dropped": dropped, "skipped": skipped}
