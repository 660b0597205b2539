"""A synthetic grounded task: coloured shapes on noisy backgrounds.

`python -m megatron_sayo.data.synthetic --out DIR --n N [--seed S] [--size WxH]`
writes DIR/data.jsonl and DIR/images/*.png. Each image holds 2-3 shapes
(square, circle, triangle), each in a different colour; each question is about
one shape and its answer can only be read inside that shape's box:

* "What colour is the square?" -> "red", box = the square;
* "Which shape is blue?"       -> "circle", box = the blue shape.

Deterministic: sample i depends only on (seed, i).
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


def make_synthetic(out_dir: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (112, 112)) -> Path:
    """Write n samples to out_dir/data.jsonl and out_dir/images/; return the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "data.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(n):
            image, row = make_sample(seed, i, size)
            rel = f"images/{row['id']}.png"
            image.save(out_dir / rel)
            f.write(json.dumps({"id": row["id"], "image": rel, "question": row["question"],
                                "answer": row["answer"], "boxes": row["boxes"]}) + "\n")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_parse_size, default=(112, 112), help="image size WxH (default 112x112)")
    args = parser.parse_args(argv)
    print(make_synthetic(args.out, args.n, args.seed, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
