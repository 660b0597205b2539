"""A few rows of each suite benchmark in its published hub schema (pyarrow parquet with the `datasets` Image
struct, or the JSON files the hub holds), written the way each hub repository lays its files out; and the SAYO
authors' prompt construction (Cratileo/Sayo eval/utils/data_loaders.py) re-derived from their rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(w: int, h: int, seed: int, mode: str = "RGB") -> bytes:
    """PNG bytes of a random image of the given mode."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    img = img.convert(mode)
    if mode == "RGBA":   # a real alpha channel: converting before or after the rescale then differs
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_cell(seed: int, w: int = 40, h: int = 30, mode: str = "RGB") -> dict:
    return {"bytes": png(w, h, seed, mode), "path": f"{seed}.png"}


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def mme_realworld(root: Path) -> list[dict]:
    rows = [{"Question_id": f"perception/remote_sensing/{i}", "Image": f"remote_sensing/{i}.png",
             "Text": ["How many planes are on the apron?", "What colour is the roof {left}?"][i],
             "Question Type": "Multiple Choice",
             "Answer choices": [["(A) 2", "(B) 3", "(C) 4", "(D) 5", "(E) The image does not feature the planes."],
                                ["(A) red", "(B) blue", "(C) green", "(D) grey", "(E) none"]][i],
             "Ground truth": ["B", "D"][i], "Category": "remote_sensing", "Subtask": "Remote Sensing",
             "Task": "Perception"} for i in range(2)]
    base = root / "MME-RealWorld-Lite" / "data"
    for i, r in enumerate(rows):
        (base / "imgs" / r["Image"]).parent.mkdir(parents=True, exist_ok=True)
        (base / "imgs" / r["Image"]).write_bytes(png(64, 48, 100 + i, "RGBA" if i else "RGB"))
    (base / "MME-RealWorld-Lite.json").write_text(json.dumps(rows, indent=1))
    return rows


def m3cot(root: Path) -> list[dict]:
    rows = [{"id": f"physical-commonsense-{i}", "category": "physical-commonsense", "image_id": f"img{i}",
             "question": ["Which object would float?", "What is the man holding?"][i],
             "choices": [["a rock", "a cork", "a coin"], ["an umbrella", "a bag", "a cane", "nothing"]][i],
             "context": "", "answer": ["B", "A"][i], "rationale": "because ...", "split": "test",
             "image": image_cell(200 + i), "domain": "commonsense", "topic": "physical"} for i in range(2)]
    schema = pa.schema([("id", pa.string()), ("category", pa.string()), ("image_id", pa.string()),
                        ("question", pa.string()), ("choices", pa.list_(pa.string())), ("context", pa.string()),
                        ("answer", pa.string()), ("rationale", pa.string()), ("split", pa.string()),
                        ("image", IMAGE), ("domain", pa.string()), ("topic", pa.string())])
    write_parquet(root / "M3CoT" / "data" / "test-00000-of-00001.parquet", rows, schema)
    write_parquet(root / "M3CoT" / "data" / "train-00000-of-00001.parquet", [{**rows[0], "id": "train-0"}], schema)
    return rows


def vstar(root: Path) -> list[dict]:
    rows = [{"image": f"direct_attributes/sa_{i}.jpg", "text": ["What is the color of the cup?\n(A) white\n(B) red"
             "\nAnswer with the option's letter from the given choices directly.", "Is the dog on the left or right "
             "of the bench?\n(A) left\n(B) right\nAnswer with the option's letter from the given choices directly."][i],
             "category": ["direct_attributes", "relative_position"][i], "question_id": i, "label": ["B", "A"][i]}
            for i in range(2)]
    base = root / "vstar_bench"
    for i, r in enumerate(rows):
        (base / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(png(50, 40, 300 + i))).convert("RGB").save(base / r["image"], format="JPEG")
    (base / "test_questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def mmstar(root: Path) -> list[dict]:
    rows = [{"index": i, "question": ["Which option describes the image?\nOptions: A: a cat, B: a dog, C: a bird, "
             "D: a fish", "How many circles are there?\nOptions: A: 1, B: 2, C: 3, D: 4"][i],
             "image": image_cell(400 + i, mode="L" if i else "RGB"), "answer": ["C", "A"][i],
             "category": "coarse perception", "l2_category": "image scene and topic",
             "meta_info": {"source": "MMBench", "split": "val", "image_path": f"images/{i}.jpg"}} for i in range(2)]
    schema = pa.schema([("index", pa.int64()), ("question", pa.string()), ("image", IMAGE), ("answer", pa.string()),
                        ("category", pa.string()), ("l2_category", pa.string()),
                        ("meta_info", pa.struct([("source", pa.string()), ("split", pa.string()),
                                                 ("image_path", pa.string())]))])
    write_parquet(root / "MMStar" / "mmstar.parquet", rows, schema)
    return rows


def mathvision(root: Path) -> list[dict]:
    rows = [{"id": str(i + 1), "question": ["Which shape comes next? <image1>", "What is the area of the square "
             "in cm^2? <image1>"][i], "options": [["A", "B", "C", "D", "E"], []][i], "image": f"images/{i + 1}.jpg",
             "decoded_image": image_cell(500 + i, mode="RGBA" if i == 0 else "RGB"), "answer": ["C", "16"][i],
             "solution": None, "level": 2, "subject": ["logic", "metric geometry - area"][i]} for i in range(2)]
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())),
                        ("image", pa.string()), ("decoded_image", IMAGE), ("answer", pa.string()),
                        ("solution", pa.string()), ("level", pa.int64()), ("subject", pa.string())])
    write_parquet(root / "MathVision" / "data" / "test-00000-of-00001.parquet", rows, schema)
    write_parquet(root / "MathVision" / "data" / "testmini-00000-of-00001.parquet", rows[:1], schema)
    return rows


def wemath(root: Path) -> list[dict]:
    rows = [{"ID": str(i + 1), "split": "testmini", "knowledge concept": "Area of rectangles",
             "question": ["The rectangle is 3 by 4. What is its area?", "How many edges does the cube have?"][i],
             "option": ["A. 7; B. 12; C. 14; D. 10; E. No correct answer", "A. 6; B. 8; C. 12; D. 24; E. No "
                        "correct answer"][i], "answer": ["B", "C"][i], "image_path": image_cell(600 + i),
             "key": ["2steps_1", "1step"][i], "question number": i + 1,
             "knowledge concept description": "The area is length times width."} for i in range(2)]
    schema = pa.schema([("ID", pa.string()), ("split", pa.string()), ("knowledge concept", pa.string()),
                        ("question", pa.string()), ("option", pa.string()), ("answer", pa.string()),
                        ("image_path", IMAGE), ("key", pa.string()), ("question number", pa.int64()),
                        ("knowledge concept description", pa.string())])
    write_parquet(root / "We-Math" / "data" / "testmini-00000-of-00001-adbfe22dcd3558e6.parquet", rows, schema)
    return rows


def chartqa(root: Path) -> list[dict]:
    rows = [{"type": "human_test", "question": ["What is the highest value in the chart?", "Which year had the "
             "lowest sales?"][i], "answer": ["62", "2015"][i], "image": image_cell(700 + i)} for i in range(2)]
    schema = pa.schema([("type", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("image", IMAGE)])
    write_parquet(root / "ChartQA" / "data" / "test-00000-of-00001.parquet", rows, schema)
    return rows


def ai2d(root: Path) -> list[dict]:
    rows = [{"question": ["Which stage comes after the larva?", "What does the arrow point to?"][i],
             "options": [["egg", "pupa", "adult", "nymph"], ["sun", "moon", "earth", "star"]][i],
             "answer": ["1", "3"][i], "image": image_cell(800 + i)} for i in range(2)]
    schema = pa.schema([("question", pa.string()), ("options", pa.list_(pa.string())), ("answer", pa.string()),
                        ("image", IMAGE)])
    write_parquet(root / "ai2d" / "data" / "test-00000-of-00001.parquet", rows, schema)
    return rows


def charxiv(root: Path) -> list[dict]:
    rows = [{"image": image_cell(900 + i), "category": "cs", "grading_query": "", "original_id": f"2310.0{i}",
             "figure_path": f"images/{i}.jpg", "descriptive_q1": "What is the x label?", "descriptive_a1": "time",
             "reasoning_q": ["Which method reaches the highest accuracy?", "At which step do the curves cross?"][i],
             "reasoning_q_source": 1, "reasoning_a": ["Ours", "400"][i], "reasoning_a_type": 2} for i in range(2)]
    schema = pa.schema([("image", IMAGE), ("category", pa.string()), ("grading_query", pa.string()),
                        ("original_id", pa.string()), ("figure_path", pa.string()),
                        ("descriptive_q1", pa.string()), ("descriptive_a1", pa.string()),
                        ("reasoning_q", pa.string()), ("reasoning_q_source", pa.int64()),
                        ("reasoning_a", pa.string()), ("reasoning_a_type", pa.int64())])
    write_parquet(root / "CharXiv" / "val.parquet", rows, schema)
    write_parquet(root / "CharXiv" / "test.parquet", [{**rows[0], "reasoning_q": "held-out test question"}], schema)
    return rows


# ------------------------------------------------------------------ the SAYO authors' construction, re-derived

AUTHORS_SYSTEM_PROMPT = ("You FIRST think about the reasoning process as an internal monologue and then provide the "
                         "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
                         "answer MUST BE put in \\boxed{}.")


def authors_choices(options) -> str:
    """Their loop: cc = 65; for each option append f'{chr(cc)}: {option}\\n'."""
    text, cc = "", 65
    for option in options:
        text += f"{chr(cc)}: {option}\n"
        cc += 1
    return text


def authors_item(name: str, row: dict) -> tuple[str, str]:
    """(question, answer) exactly as their load_<benchmark>_dataset builds them from one `datasets` row."""
    if name == "mme-realworld":
        return f"Question:{row['Text']}\nChoices:{row['Answer choices']}", row["Ground truth"]
    if name == "m3cot":
        return f"Question:{row['question']}\nChoices:{authors_choices(row['choices'])}", row["answer"]
    if name == "vstar":
        return row["text"], row["label"]
    if name in ("mmstar", "chartqa"):
        return row["question"], row["answer"]
    if name == "mathvision":
        if row["options"] != []:
            return f"{row['question']}\nOptions: {authors_choices(row['options'])}", row["answer"]
        return row["question"], row["answer"]
    if name == "wemath":
        return (f"{row['question']}\n\nOptions: {row['option']}\nYour final answer must be one of A, B, C, or D.",
                row["answer"])
    if name == "ai2d":
        return f"Question:{row['question']}\nChoices:{authors_choices(row['options'])}", chr(65 + int(row["answer"]))
    if name == "charxiv":
        return row["reasoning_q"], row["reasoning_a"]
    raise AssertionError(name)



WRITERS = {"mme-realworld": mme_realworld, "m3cot": m3cot, "vstar": vstar, "mmstar": mmstar,
           "mathvision": mathvision, "wemath": wemath, "chartqa": chartqa, "ai2d": ai2d, "charxiv": charxiv}


def write_suite(root: Path) -> dict[str, list[dict]]:
    """All nine fixture datasets under root; {benchmark name: the rows of the evaluated split}."""
    return {name: write(root) for name, write in WRITERS.items()}
