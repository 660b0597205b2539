"""Suite samples -> nemo-evaluator BYOB rows: each image rescaled as the SAYO authors do and written as a PNG file
(the BYOB runner sends text only; our server turns `<image_url>PATH</image_url>` into an image part)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from megatron_sayo.eval.benchmarks.hub_data import DatasetError
from megatron_sayo.formats.atomic import write_bytes_atomic
from megatron_sayo.eval.benchmarks.suite import SuiteSample


def authors_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size the authors rescale an image to: down to at most max_pixels, then up to at least min_pixels,
    each by one factor sqrt(bound / area) with the sides truncated to integers (eval/utils/processing.py)."""
    if width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    return width, height


def load_image(sample: SuiteSample, min_pixels: int, max_pixels: int):
    """The sample's image as the authors send it: RGB if read from a file, rescaled into the pixel bounds."""
    from PIL import Image

    ref = sample.image
    try:
        image = Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data))
        image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{ref.where}: cannot decode the image ({exc})") from None
    if sample.convert_rgb:
        image = image.convert("RGB")
    size = authors_size(image.width, image.height, min_pixels, max_pixels)
    return image.resize(size) if size != image.size else image


def write_png(image, path: Path) -> None:
    """PNG-encode to path atomically (temporary file in the same directory, then rename)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue(), fsync=False)


def byob_rows(samples: list[SuiteSample], image_dir: Path, min_pixels: int, max_pixels: int) -> list[dict]:
    """BYOB dataset rows (id, image_url, question, answer) with every image written under image_dir."""
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples):
        path = (image_dir / f"{i:06d}.png").resolve()
        write_png(load_image(s, min_pixels, max_pixels), path)
        rows.append({"id": s.id, "image_url": str(path), "question": s.question, "answer": s.answer})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """JSON lines, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"),
                       fsync=False)
