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


def test_sayo_mix_cli(refocus_repo, gqa_files, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "prepare_sayo_mix.py"), "--refocus",
                           *map(str, _train_shards(refocus_repo)), "--gqa-questions", str(gqa_files / "q.json"),
                           "--gqa-scene-graphs", str(gqa_files / "sg.json"), "--gqa-images",
                           str(gqa_files / "images"), "--out", str(tmp_path / "mix")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "GQA)" in proc.stdout and len(_rows(tmp_path / "mix" / "data.jsonl")) > 5
