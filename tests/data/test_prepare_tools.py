"""ReFocus, GQA and the SAYO mix (data/refocus.py, gqa.py, sayo_mix.py and their tools) on fixtures in the real
layouts: ReFocus parquet written with pyarrow in the published schema, GQA questions/scene graphs as released."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_sayo.data import gqa, refocus, sayo_mix
from megatron_sayo.data.grounded import check_file, load_grounded

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _encoded(size, fmt, shade):
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), shade, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _rows(jsonl):
    return [json.loads(line) for line in Path(jsonl).read_text().splitlines()]


# ---------------------------------------------------------------- ReFocus (the published parquet schema)

def _boxes(*boxes):
    """focus_areas_bbox as ReFocus_Data stores it: a struct of lists (HF datasets' sequence of boxes)."""
    return {k: [b[i] for b in boxes] for i, k in enumerate(("x1", "y1", "x2", "y2"))}


def _refocus_rows(n, seed=0):
    """n rows: mostly one or two boxes, every 4th row with empty box lists, a few boxes outside the image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 4 == 3:
            boxes = _boxes()
        elif i % 7 == 5:
            boxes = _boxes((100, 100, 120, 120))                        # outside the 80x60 image: invalid
        else:
            x, y = int(rng.integers(0, 50)), int(rng.integers(0, 30))
            boxes = _boxes((x, y, x + 20, y + 15), (0, 0, 5, 5)) if i % 2 else _boxes((x, y, x + 20, y + 15))
        rows.append((f"rf-{i:03d}", boxes, "JPEG" if i % 5 == 1 else "PNG"))
    return rows


REFOCUS_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("thoughts", pa.list_(pa.string())),
    ("focus_areas_bbox", pa.struct([(k, pa.list_(pa.int32())) for k in ("x1", "y1", "x2", "y2")])),
    ("source", pa.string()),
])


def _refocus_shard(path, rows):
    table = pa.Table.from_pylist([
        {"id": r[0], "question": f"What is shown in {r[0]}?", "answer": f"ans-{r[0]}",
         "image": {"bytes": _encoded((80, 60), r[2], 40 + int(r[0][3:]) % 100), "path": None},
         "thoughts": ["look"], "focus_areas_bbox": r[1], "source": "chartqa"} for r in rows], schema=REFOCUS_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


ALL_REFOCUS = _refocus_rows(41)


@pytest.fixture
def refocus_repo(tmp_path):
    """A ReFocus_Data checkout: data/train-0000k-of-00003.parquet (uneven shards) and a test shard."""
    repo = tmp_path / "ReFocus_Data"
    cuts = [0, 17, 30, 41]
    for k in range(3):
        _refocus_shard(repo / "data" / f"train-0000{k}-of-00003.parquet", ALL_REFOCUS[cuts[k]:cuts[k + 1]])
    _refocus_shard(repo / "data" / "test-00000-of-00001.parquet", _refocus_rows(5, seed=9))
    return repo


def _train_shards(repo):
    return sorted((repo / "data").glob("train-*.parquet"))


def test_refocus_sayo_subset_is_the_datasets_split(refocus_repo, tmp_path):
    """Same rows, same order, same first box as the authors' load_dataset + train_test_split(0.25, seed=42)."""
    import datasets

    train = datasets.load_dataset(str(refocus_repo), split="train", cache_dir=str(tmp_path / "hf_cache"))
    subset = train.train_test_split(test_size=0.25, seed=42)["test"]
    expected = [(r["id"], [r["focus_areas_bbox"][k][0] for k in ("x1", "y1", "x2", "y2")])
                for r in subset if r["focus_areas_bbox"]["x1"] != []]
    assert len(train) == 41 and len(subset) == 11 and 0 < len(expected) < 11   # some subset rows have no box

    shards = list(reversed(_train_shards(refocus_repo)))                       # order given does not matter
    done = refocus.prepare(shards, tmp_path / "out", recipe="sayo")
    rows = _rows(tmp_path / "out" / "data.jsonl")
    invalid = {r[0] for r in ALL_REFOCUS if r[1]["x1"][:1] == [100]}
    kept = [(sid, box) for sid, box in expected if sid not in invalid]
    assert [(r["id"], r["boxes"]) for r in rows] == [(sid, [box]) for sid, box in kept]
    assert done == {"written": len(kept), "dropped": len(expected) - len(kept),
                    "no_box": 11 - len(expected)}
    first = next(r for r in subset if r["id"] == rows[0]["id"])
    assert rows[0]["answer"] == first["answer"] and rows[0]["question"] == first["question"]
    good, errors = check_file(tmp_path / "out" / "data.jsonl")
    assert errors == [] and len(good) == len(kept)


def test_refocus_sayo_refuses_other_splits_and_an_existing_output(refocus_repo, tmp_path):
    with pytest.raises(ValueError, match="train split: pass only the train-"):
        refocus.prepare(sorted((refocus_repo / "data").glob("*.parquet")), tmp_path / "x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="mine"):
        refocus.prepare(_train_shards(refocus_repo), tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ReFocus_Data", "mine"]   # no temp folder left


def test_refocus_fraction_recipe_reads_the_real_schema(refocus_repo, tmp_path):
    boxed = [r for r in ALL_REFOCUS if r[1]["x1"]]
    done = refocus.prepare(_train_shards(refocus_repo), tmp_path / "all", recipe="fraction", fraction=1.0)
    rows = {r["id"]: r for r in _rows(tmp_path / "all" / "data.jsonl")}
    valid = [r for r in boxed if r[1]["x1"][0] != 100]
    assert sorted(rows) == sorted(r[0] for r in valid)
    assert done["no_box"] == len(ALL_REFOCUS) - len(boxed) and done["dropped"] == len(boxed) - len(valid)
    two = next(r for r in valid if len(r[1]["x1"]) == 2)                       # only the first box is the region
    assert rows[two[0]]["boxes"] == [[two[1][k][0] for k in ("x1", "y1", "x2", "y2")]]
    jpeg = next(r for r in valid if r[2] == "JPEG")
    assert rows[jpeg[0]]["image"] == f"images/{jpeg[0]}.jpg"
    half = refocus.prepare(_train_shards(refocus_repo), tmp_path / "half", recipe="fraction", fraction=0.5, seed=3)
    assert half["written"] + half["dropped"] == round(0.5 * len(boxed))


@pytest.mark.multiproc
def test_refocus_cli(refocus_repo, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "prepare_refocus.py"), "--out", str(tmp_path / "o"),
                           "--recipe", "sayo", *map(str, _train_shards(refocus_repo))], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "row(s) written" in proc.stdout and "without a focus box" in proc.stdout
    proc = subprocess.run([sys.executable, str(TOOLS / "prepare_refocus.py"), "--out", str(tmp_path / "o"),
                           *map(str, _train_shards(refocus_repo))], capture_output=True, text=True)
    assert proc.returncode == 2 and "exists" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- GQA

SCENE_GRAPHS = {
    "img1": {"width": 100, "height": 80, "objects": {
        "101": {"name": "cup", "x": 10, "y": 20, "w": 30, "h": 15, "attributes": ["red"], "relations": []},
        "102": {"name": "table", "x": 0, "y": 30, "w": 100, "h": 50, "attributes": [], "relations": []},
        "103": {"name": "line", "x": 50, "y": 5, "w": 0, "h": 10, "attributes": [], "relations": []},
    }},
    "img2": {"width": 100, "height": 80, "objects": {
        "201": {"name": "dog", "x": 60, "y": 40, "w": 30, "h": 30, "attributes": [], "relations": []},
        "202": {"name": "cat", "x": 5, "y": 5, "w": 20, "h": 20, "attributes": [], "relations": []},
    }},
}


def _q(image, question, answer, annotations=None, semantic=None, semantic_str=None):
    q = {"imageId": image, "question": question, "answer": answer, "fullAnswer": f"It is {answer}.",
         "isBalanced": True, "types": {"structural": "query"},
         "annotations": annotations or {"answer": {}, "question": {}, "fullAnswer": {}},
         "semantic": semantic or []}
    if semantic_str is not None:
        q["semanticStr"] = semantic_str
    return q


QUESTIONS = {
    "q1": _q("img1", "What is on the table?", "cup",      # answer object wins over question object
             {"answer": {"0": "101"}, "question": {"4": "102"}, "fullAnswer": {"1": "101"}},
             semantic_str="select: table (102)->relate: _,on,s (101) [0]->query: name [1]"),
    "q2": _q("img1", "What colour is the table?", "brown", {"answer": {}, "question": {"4": "102"}, "fullAnswer": {}},
             semantic_str="select: table (102)->query: color [0]"),
    "q3": _q("img2", "Is the animal a dog?", "yes", semantic=[
        {"operation": "select", "dependencies": [], "argument": "cat (202)"},
        {"operation": "relate", "dependencies": [0], "argument": "animal,to the right of,s (201)"},
        {"operation": "verify name", "dependencies": [1], "argument": "dog"}],
        semantic_str="select: cat (202)->relate: animal,to the right of,s (201) [0]->verify name: dog [1]"),
    "q4": _q("img2", "Are these animals?", "yes", {"answer": {}, "question": {"2:4": "201,202"}, "fullAnswer": {}},
             semantic_str="select: animal (202)->exist: ? [0]"),
    "q5": _q("img1", "What is this?", "ghost", {"answer": {"0": "999"}, "question": {}, "fullAnswer": {}},
             semantic_str="select: ghost (999)->query: name [0]"),
    "q6": _q("img3", "What is this?", "cup", {"answer": {"0": "101"}, "question": {}, "fullAnswer": {}},
             semantic_str="select: cup (101)->query: name [0]"),
    "q7": _q("img1", "Is the line thin?", "yes", {"answer": {}, "question": {"2": "103"}, "fullAnswer": {}},
             semantic_str="select: line (103)->verify thickness: thin [0]"),
    "q8": _q("img1", "Is it sunny?", "yes", semantic_str="select: sky->verify weather: sunny [0]"),
    # a later "(...)" that is not an id: the expression then settles on the earlier id
    "q9": _q("img1", "What is on the table?", "cup",
             semantic_str="select: table (102)->relate: cup,on,s (101) [0]->query: name (of) [1]"),
    "q10": _q("img2", "Is it night?", "no"),
}

# Hand-written expectations: boxes are [x, y, x + w, y + h] of the referred objects.
EXPECTED_GQA = {
    "gqa-q1": [[10, 20, 40, 35]],
    "gqa-q2": [[0, 30, 100, 80]],
    "gqa-q3": [[60, 40, 90, 70]],
    "gqa-q4": [[60, 40, 90, 70], [5, 5, 25, 25]],
}


@pytest.fixture
def gqa_files(tmp_path):
    images = tmp_path / "gqa" / "images"
    images.mkdir(parents=True)
    for name in ("img1", "img2"):
        (images / f"{name}.jpg").write_bytes(_encoded((100, 80), "JPEG", 90))
    (tmp_path / "gqa" / "q.json").write_text(json.dumps(QUESTIONS))
    (tmp_path / "gqa" / "sg.json").write_text(json.dumps(SCENE_GRAPHS))
    return tmp_path / "gqa"


def test_gqa_union_referred_objects_and_boxes(gqa_files, tmp_path, caplog):
    done = gqa.prepare(gqa_files / "q.json", gqa_files / "sg.json", gqa_files / "images", tmp_path / "out",
                       recipe="union")
    assert (done["read"], done["written"], done["dropped"]) == (len(QUESTIONS), 4, 1)   # q7: zero-width box
    (dropped,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped.startswith(f"{tmp_path / 'out' / 'data.jsonl'}: prepared row 5 (id 'gqa-q7') dropped")  # issue 29
    rows = {r["id"]: r for r in _rows(tmp_path / "out" / "data.jsonl")}
    assert {k: r["boxes"] for k, r in rows.items()} == EXPECTED_GQA
    assert rows["gqa-q1"]["image"] == "../gqa/images/img1.jpg"
    assert rows["gqa-q3"]["question"] == "Is the animal a dog?" and rows["gqa-q3"]["answer"] == "yes"
    assert "short_answer" not in rows["gqa-q1"]
    good, errors = check_file(tmp_path / "out" / "data.jsonl")
    assert errors == [] and len(good) == 4


def test_gqa_union_max_rows_is_seeded(gqa_files, tmp_path):
    questions, graphs = json.loads((gqa_files / "q.json").read_text()), SCENE_GRAPHS
    a = gqa.union_rows(questions, graphs, gqa_files / "images", tmp_path, max_rows=2, seed=1)
    b = gqa.union_rows(dict(reversed(list(questions.items()))), graphs, gqa_files / "images", tmp_path,
                       max_rows=2, seed=1)
    assert len(a) == 2 and [r["id"] for r in a] == [r["id"] for r in b]


# Hand-read: the authors' expression takes the "(id)" after which no further "(...)" group follows.
EXPECTED_SAYO_OBJECT = {
    "q1": "101", "q2": "102", "q3": "201", "q4": "202", "q9": "102",
}


def test_gqa_sayo_one_object_full_answer_and_short_answer(gqa_files, tmp_path):
    done = gqa.prepare(gqa_files / "q.json", gqa_files / "sg.json", gqa_files / "images", tmp_path / "out")
    rows = _rows(tmp_path / "out" / "data.jsonl")
    objects = {**SCENE_GRAPHS["img1"]["objects"], **SCENE_GRAPHS["img2"]["objects"]}
    assert [r["id"] for r in rows] == list(EXPECTED_SAYO_OBJECT)              # question-file order
    for r in rows:
        o = objects[EXPECTED_SAYO_OBJECT[r["id"]]]
        assert r["boxes"] == [[o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]]]
        assert r["answer"] == QUESTIONS[r["id"]]["fullAnswer"] and r["short_answer"] == QUESTIONS[r["id"]]["answer"]
    assert done["skipped"] == {"no object id in semanticStr": 2, "object not in the scene graph": 2}
    assert done["dropped"] == 1                                              # q7's zero-width line
    samples = load_grounded(tmp_path / "out" / "data.jsonl")
    assert samples[0].reference("short_answer") == "cup" and samples[0].reference("answer") == "It is cup."
    capped = gqa.prepare(gqa_files / "q.json", gqa_files / "sg.json", gqa_files / "images", tmp_path / "cap",
                         max_rows=2)
    assert [r["id"] for r in _rows(tmp_path / "cap" / "data.jsonl")] == ["q1", "q2"] and capped["written"] == 2


@pytest.mark.multiproc
def test_gqa_cli(gqa_files, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "prepare_gqa.py"), "--questions", str(gqa_files / "q.json"),
                           "--scene-graphs", str(gqa_files / "sg.json"), "--images", str(gqa_files / "images"),
                           "--out", str(tmp_path / "o"), "--recipe", "union"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(QUESTIONS)} question(s) read, 4 row(s) written, 1 dropped" in proc.stdout


# ---------------------------------------------------------------- the SAYO mix

def test_sayo_mix_refocus_then_gqa_until_the_cap(refocus_repo, gqa_files, tmp_path):
    import datasets

    train = datasets.load_dataset(str(refocus_repo), split="train", cache_dir=str(tmp_path / "hf_cache"))
    boxed = [r["id"] for r in train.train_test_split(test_size=0.25, seed=42)["test"] if r["focus_areas_bbox"]["x1"]]
    args = (_train_shards(refocus_repo), gqa_files / "q.json", gqa_files / "sg.json", gqa_files / "images")
    done = sayo_mix.prepare(*args, tmp_path / "mix", max_rows=len(boxed) + 3)
    rows = _rows(tmp_path / "mix" / "data.jsonl")
    invalid = {r[0] for r in ALL_REFOCUS if r[1]["x1"][:1] == [100]}
    assert [r["id"] for r in rows] == [i for i in boxed if i not in invalid] + ["q1", "q2", "q3"]
    assert (done["refocus"], done["gqa"]) == (len(boxed), 3)
    assert all("short_answer" not in r for r in rows[:-3]) and [r["short_answer"] for r in rows[-3:]] == \
        [QUESTIONS[q]["answer"] for q in ("q1", "q2", "q3")]
    assert rows[-1]["image"] == "../gqa/images/img2.jpg"
    assert check_file(tmp_path / "mix" / "data.jsonl")[1] == []
    assert sayo_mix.SAYO_MIX_ROWS == 20_001          # the authors' loop stops once len(rows) > 20000
    one = sayo_mix.prepare(*args, tmp_path / "one", max_rows=1)
    assert (one["refocus"], one["gqa"]) == (1, 0)


@pytest.mark.multiproc
def test_sayo_mix_cli(refocus_repo, gqa_files, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "prepare_sayo_mix.py"), "--refocus",
                           *map(str, _train_shards(refocus_repo)), "--gqa-questions", str(gqa_files / "q.json"),
                           "--gqa-scene-graphs", str(gqa_files / "sg.json"), "--gqa-images",
                           str(gqa_files / "images"), "--out", str(tmp_path / "mix")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "GQA)" in proc.stdout and len(_rows(tmp_path / "mix" / "data.jsonl")) > 5


# ---------------------------------------------------------------- GQA off the schema (issue 29 item 6)

def _graphs_with(image, obj_id, obj):
    """SCENE_GRAPHS (the release's layout) with one object replaced (obj None: removed from the image)."""
    graphs = json.loads(json.dumps(SCENE_GRAPHS))
    graphs[image]["objects"][obj_id] = obj
    return graphs


TABLE = SCENE_GRAPHS["img1"]["objects"]["102"]        # q2 (sayo and union) and q9 (sayo) refer to it
OFF_SCHEMA_TABLES = {                                  # object -> (field, words the message must hold)
    "no w": ({k: v for k, v in TABLE.items() if k != "w"}, "w", "is missing"),
    "w string": ({**TABLE, "w": "20"}, "w", '"20" (a JSON string), expected a JSON number'),
    "x and w strings": ({**TABLE, "x": "0", "w": "20"}, "x", '"0" (a JSON string)'),   # old: silently x2 "020"
    "h null": ({**TABLE, "h": None}, "h", "null (a JSON null)"),
    "y boolean": ({**TABLE, "y": True}, "y", "true (a JSON boolean)"),
    "w NaN": ({**TABLE, "w": float("nan")}, "w", "expected a finite number"),
    "h negative": ({**TABLE, "h": -5}, "h", "expected >= 0"),
}


@pytest.mark.parametrize("recipe", ["sayo", "union"])
@pytest.mark.parametrize("case", list(OFF_SCHEMA_TABLES))
def test_gqa_off_schema_object_stops_naming_question_object_and_field(gqa_files, tmp_path, recipe, case):
    """Default on_error="stop": the first question using the object raises a ValueError (what the tool reports
    with exit 2) naming the questions file, the question id, the image, the object (id and JSON) and the field;
    nothing is published (was: KeyError / TypeError, or for two strings a box with x2 = "0" + "20")."""
    obj, field, words = OFF_SCHEMA_TABLES[case]
    (gqa_files / "bad.json").write_text(json.dumps(_graphs_with("img1", "102", obj)))
    with pytest.raises(ValueError) as caught:
        gqa.prepare(gqa_files / "q.json", gqa_files / "bad.json", gqa_files / "images", tmp_path / "out",
                    recipe=recipe)
    exc = caught.value
    assert isinstance(exc, gqa.GQASchemaError)
    assert (exc.question_id, exc.field) == ("q2", field)             # q2 is the first user in both orders
    message = str(exc)
    assert message.startswith(f"{gqa_files / 'q.json'}: question 'q2' is off the GQA schema: ")
    assert "scene graph of image 'img1', object '102' {" in message and '"name": "table"' in message
    assert f"field {field!r} " in message and words in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gqa"]      # no output, no temporary folder left


OFF_SCHEMA_ELSEWHERE = {   # (questions change, scene graphs change) -> (question id, field, words)
    "object not an object": (None, ("img1", "102", [0, 30, 100, 50]), "q2", None,
                             "(a JSON array), expected a JSON object"),
    "objects not an object": (None, ("img1", None, []), "q1", "objects", "expected a JSON object"),
    "scene graph a string": (None, ("img1", None, "n/a"), "q1", None, '"n/a" (a JSON string)'),
    "imageId missing": (("q1", "imageId", None), None, "q1", "imageId", "is missing"),
    "imageId a number": (("q1", "imageId", 1), None, "q1", "imageId", "1 (a JSON number), expected a JSON string"),
    "imageId a path": (("q1", "imageId", "../img1"), None, "q1", "imageId", "expected an image file-name stem"),
    "question a list": (("q1", "question", ["What?"]), None, "q1", "question", "(a JSON array)"),
}


@pytest.mark.parametrize("case", list(OFF_SCHEMA_ELSEWHERE))
def test_gqa_other_off_schema_values_name_question_and_field(gqa_files, tmp_path, case):
    q_change, g_change, qid, field, words = OFF_SCHEMA_ELSEWHERE[case]
    questions = json.loads(json.dumps(QUESTIONS))
    graphs = json.loads(json.dumps(SCENE_GRAPHS))
    if q_change:
        q, key, value = q_change
        if value is None:
            del questions[q][key]
        else:
            questions[q][key] = value
    if g_change:
        image, obj_id, value = g_change
        if obj_id is None:
            graphs[image] = value if isinstance(value, str) else {**graphs[image], "objects": value}
        else:
            graphs[image]["objects"][obj_id] = value
    (gqa_files / "bq.json").write_text(json.dumps(questions))
    (gqa_files / "bg.json").write_text(json.dumps(graphs))
    for recipe in ("sayo", "union"):
        with pytest.raises(gqa.GQASchemaError) as caught:
            gqa.prepare(gqa_files / "bq.json", gqa_files / "bg.json", gqa_files / "images", tmp_path / recipe,
                        recipe=recipe)
        assert (caught.value.question_id, caught.value.field) == (qid, field), recipe
        assert f"question {qid!r}" in str(caught.value) and words in str(caught.value)
        assert not (tmp_path / recipe).exists()


def test_gqa_union_off_schema_annotations_and_semantic(gqa_files, tmp_path):
    """union reads annotations and the semantic program: other shapes are named too (was: AttributeError)."""
    for q_id, key, value, field in (("q1", "annotations", {"answer": ["101"]}, "annotations.answer"),
                                    ("q3", "semantic", [{"argument": ["cat", 202]}], "semantic[0].argument")):
        questions = json.loads(json.dumps(QUESTIONS))
        questions[q_id][key] = value
        (gqa_files / "bq.json").write_text(json.dumps(questions))
        with pytest.raises(gqa.GQASchemaError) as caught:
            gqa.prepare(gqa_files / "bq.json", gqa_files / "sg.json", gqa_files / "images", tmp_path / "o",
                        recipe="union")
        assert (caught.value.question_id, caught.value.field) == (q_id, field)


def _run_gqa_tool(gqa_files, graphs_file, out, *extra):
    return subprocess.run([sys.executable, str(TOOLS / "prepare_gqa.py"), "--questions", str(gqa_files / "q.json"),
                           "--scene-graphs", str(graphs_file), "--images", str(gqa_files / "images"),
                           "--out", str(out), *extra], capture_output=True, text=True)


@pytest.mark.multiproc
def test_gqa_cli_on_error_stop_and_skip(gqa_files, tmp_path):
    """The tool: default --on-error stop exits 2 with the error (question id, object, field), no traceback and no
    output; --on-error skip writes the other questions, logs each skipped one with its reason and counts them in
    the summary (sayo: q2 and q9 use object 102; union: q2 only)."""
    no_w = {k: v for k, v in TABLE.items() if k != "w"}
    (gqa_files / "no_w.json").write_text(json.dumps(_graphs_with("img1", "102", no_w)))
    (gqa_files / "w_str.json").write_text(json.dumps(_graphs_with("img1", "102", {**TABLE, "w": "20"})))

    for graphs_file, words in (("no_w.json", "field 'w' is missing"), ("w_str.json", "field 'w' is \"20\"")):
        proc = _run_gqa_tool(gqa_files, gqa_files / graphs_file, tmp_path / "stop")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: {gqa_files / 'q.json'}: question 'q2' is off the GQA schema: "
                                      f"scene graph of image 'img1', object '102' {{")
        assert words in proc.stderr and "--on-error skip" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "stop").exists()

    proc = _run_gqa_tool(gqa_files, gqa_files / "w_str.json", tmp_path / "skip", "--on-error", "skip")
    assert proc.returncode == 0, proc.stderr
    logged = [line for line in proc.stderr.splitlines() if "skipped (off the GQA schema" in line]
    assert [line.split(": question ")[1].split(" ")[0] for line in logged] == ["'q2'", "'q9'"]
    assert all(line.startswith(str(gqa_files / "q.json")) and "object '102'" in line and
               "field 'w' is \"20\" (a JSON string), expected a JSON number" in line for line in logged)
    assert ("3 row(s) written, 1 dropped by validation; skipped: 2 no object id in semanticStr, "
            "2 object not in the scene graph, 2 off-schema scene-graph object field 'w'") in proc.stdout
    assert [r["id"] for r in _rows(tmp_path / "skip" / "data.jsonl")] == ["q1", "q3", "q4"]   # q7 dropped

    proc = _run_gqa_tool(gqa_files, gqa_files / "no_w.json", tmp_path / "skip_u", "--on-error", "skip",
                         "--recipe", "union")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skipped (off the GQA schema") == 1 and "question 'q2'" in proc.stderr
    assert "1 off-schema scene-graph object field 'w'" in proc.stdout
    assert sorted(r["id"] for r in _rows(tmp_path / "skip_u" / "data.jsonl")) == ["gqa-q1", "gqa-q3", "gqa-q4"]


def test_sayo_mix_on_error(refocus_repo, gqa_files, tmp_path):
    """The mix reads GQA through the same rows: stop names the question and field, skip counts it."""
    (gqa_files / "bad.json").write_text(json.dumps(_graphs_with("img1", "101", {**TABLE, "w": "20"})))
    args = (_train_shards(refocus_repo), gqa_files / "q.json", gqa_files / "bad.json", gqa_files / "images")
    with pytest.raises(gqa.GQASchemaError, match=r"question 'q1' .*object '101'.*field 'w'"):
        sayo_mix.prepare(*args, tmp_path / "mix", max_rows=100)
    assert not (tmp_path / "mix").exists()
    done = sayo_mix.prepare(*args, tmp_path / "mix", max_rows=100, on_error="skip")
    assert done["gqa_skipped"]["off-schema scene-graph object field 'w'"] == 1
    assert "q1" not in [r["id"] for r in _rows(tmp_path / "mix" / "data.jsonl")]
