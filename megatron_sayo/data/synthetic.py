"""Synthetic grounded tasks on noisy backgrounds, two of them (`task`):

`shapes`: 2-3 shapes (square, circle, triangle), each in a different colour; each question is about one
shape and its answer can only be read inside that shape's box:

* "What colour is the square?" -> "red", box = the square;
* "Which shape is blue?"       -> "circle", box = the blue shape.

`tiles`: 3 two-colour tiles, each exactly one visual token (a 28 x 28 cell of the language model's token grid:
top half one colour, bottom half another); "What is under red?" -> the bottom colour of the tile whose top is
red, box = that tile. The question names something visible only in the region and the answer is visible only
there too (every tile's bottom colour differs), so answering is a lookup from the question into one image token:
a task a tiny model learns, unlike recognising shapes (the ablation's toy, experiments/ablation.py).

`tiles_reasoning`: the same images and questions; each row also carries a `reasoning` that describes ONE tile,
"green over yellow", chosen uniformly among the three (the asked one a third of the time). The warm-up writes
it before the answer, so it teaches the policy to look somewhere before it answers, not where; which tile a
completion describes is then a choice GRPO can reinforce.

`python -m megatron_sayo.data.synthetic --out DIR --n N [--task shapes|tiles] [--seed S] [--size WxH]`
writes DIR/data.jsonl and DIR/images/*.png. Deterministic: sample i depends only on (task, seed, i).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("square", "circle", "triangle")
TASKS = ("shapes", "tiles", "tiles_reasoning")
TILE = 28          # one visual token of Qwen2.5-VL: a 14-pixel patch, 2 x 2 merged
TILES_PER_IMAGE = 3
TILES_QUESTION = "What is under {}?"   # {} = the asked tile's top colour
TILES_REASONING = "{} over {}"          # one tile described: top colour, bottom colour


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Grey noise around a random mid-grey level, so shapes are not the only structure."""
    w, h = size
    base = rng.integers(90, 170)
    noise = rng.normal(0.0, 25.0, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _place(rng: np.random.Generator, size: tuple[int, int], side: int,
           taken: list[list[int]]) -> list[int] | None:
    """A box [x1, y1, x2, y2] of the given side that does not overlap `taken` (None after 50 tries)."""
    w, h = size
    for _ in range(50):
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        box = [x, y, x + side, y + side]
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: list[int], rgb: tuple[int, int, int]) -> None:
    """Draw a filled shape inside box (exclusive right/bottom edge), touching all four sides."""
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "square":
        draw.rectangle([x1, y1, x2, y2], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=rgb)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=rgb)


def make_sample(seed: int, index: int, size: tuple[int, int] = (112, 112)) -> tuple[Image.Image, dict]:
    """One image and its row fields (without the image path), a function of (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    n_shapes = int(rng.integers(2, 4))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_shapes]]
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n_shapes]]
    lo, hi = max(8, min(size) // 6), max(9, min(size) // 3)
    placed: list[tuple[str, str, list[int]]] = []
    for shape, colour in zip(shapes, colours):
        box = _place(rng, size, int(rng.integers(lo, hi + 1)), [b for _, _, b in placed])
        if box is not None:
            _draw(draw, shape, box, COLOURS[colour])
            placed.append((shape, colour, box))
    shape, colour, box = placed[int(rng.integers(len(placed)))]
    if rng.random() < 0.5:
        question, answer = f"What colour is the {shape}?", colour
    else:
        question, answer = f"Which shape is {colour}?", shape
    return image, {"id": f"syn-{seed}-{index:06d}", "question": question, "answer": answer, "boxes": [box]}


def make_tile_sample(seed: int, index: int, size: tuple[int, int] = (112, 112),
                     reasoning: bool = False) -> tuple[Image.Image, dict]:
    """One `tiles` image and its row fields: tiles on cells of the token grid, distinct top and bottom colours.

    The image size is kept a multiple of TILE so that the processor does not resize it and a tile stays one
    token; a size that is not is an error."""
    w, h = size
    if w % TILE or h % TILE or (w // TILE) * (h // TILE) < TILES_PER_IMAGE:
        raise ValueError(f"tiles: image size {w}x{h} must be multiples of {TILE} with at least "
                         f"{TILES_PER_IMAGE} cells")
    rng = np.random.default_rng([seed, index, 1])
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    names = list(COLOURS)
    cells = rng.permutation((w // TILE) * (h // TILE))[:TILES_PER_IMAGE]
    tops = [names[i] for i in rng.permutation(len(names))[:TILES_PER_IMAGE]]
    while True:  # bottoms: distinct from each other and from their own tile's top
        bottoms = [names[i] for i in rng.permutation(len(names))[:TILES_PER_IMAGE]]
        if all(t != b for t, b in zip(tops, bottoms)):
            break
    boxes = []
    for cell, top, bottom in zip(cells, tops, bottoms):
        x, y = int(cell % (w // TILE)) * TILE, int(cell // (w // TILE)) * TILE
        draw.rectangle([x, y, x + TILE - 1, y + TILE // 2 - 1], fill=COLOURS[top])
        draw.rectangle([x, y + TILE // 2, x + TILE - 1, y + TILE - 1], fill=COLOURS[bottom])
        boxes.append([x, y, x + TILE, y + TILE])
    k, seen = int(rng.integers(TILES_PER_IMAGE)), int(rng.integers(TILES_PER_IMAGE))
    row = {"id": f"tiles-{seed}-{index:06d}", "question": TILES_QUESTION.format(tops[k]), "answer": bottoms[k],
           "boxes": [boxes[k]]}
    return image, row | ({"reasoning": TILES_REASONING.format(tops[seen], bottoms[seen])} if reasoning else {})


def make_synthetic(out_dir: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (112, 112),
                   task: str = "shapes") -> Path:
    """Write n samples of `task` to out_dir/data.jsonl and out_dir/images/; return the JSONL path."""
    if task not in TASKS:
        raise ValueError(f"synthetic task must be one of {TASKS}, got {task!r}")

    def sample(seed: int, index: int, size: tuple[int, int]) -> tuple[Image.Image, dict]:
        if task == "shapes":
            return make_sample(seed, index, size)
        return make_tile_sample(seed, index, size, reasoning=task == "tiles_reasoning")

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "data.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(n):
            image, row = sample(seed, i, size)
            rel = f"images/{row['id']}.png"
            image.save(out_dir / rel)
            f.write(json.dumps({"id": row["id"], "image": rel, **{k: v for k, v in row.items() if k != "id"}})
                    + "\n")
    return jsonl


def _parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 112x112, got {text!r}") from None
    if w < 28 or h < 28:
        raise argparse.ArgumentTypeError(f"size must be at least 28x28, got {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Write a synthetic grounded dataset (shapes and colours).")
    parser.add_argument("--out", required=True, help="output folder (data.jsonl and images/)")
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--task", choices=TASKS, default="shapes",
                        help="which synthetic task (see this module's docstring)")
    parser.add_argument("--seed", type=int, default=0, help="sample i depends only on (task, seed, i)")
    parser.add_argument("--size", type=_parse_size, default=(112, 112), help="image size WxH (default 112x112)")
    args = parser.parse_args(argv)
    print(make_synthetic(args.out, args.n, args.seed, args.size, args.task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
