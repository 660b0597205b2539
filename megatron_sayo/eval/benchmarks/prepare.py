"""Suite samples -> nemo-evaluator BYOB rows: each image rescaled as the SAYO authors do and given to the server as
a file (the BYOB runner sends text only; our server turns `<image_url>PATH</image_url>` into an image part)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

from megatron_sayo.eval.benchmarks.hub_data import DatasetError
from megatron_sayo.eval.benchmarks.suite import SuiteSample
from megatron_sayo.formats.atomic import write_bytes_atomic


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
    """(image, rescaled): the sample's image as the authors send it (RGB if read from a file, rescaled into the
    pixel bounds) and whether the rescale changed its size."""
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
    return (image.resize(size), True) if size != image.size else (image, False)


def write_png(image, path: Path) -> None:
    """PNG-encode to path atomically (modes PNG cannot hold, e.g. CMYK, as RGB: what the server sees anyway)."""
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue(), fsync=False)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src (no extra disk), or a copy across file systems; replaced atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def image_url(sample: SuiteSample, index: int, image_dir: Path, min_pixels: int, max_pixels: int) -> str:
    """The path under image_dir the server reads the sample's image from (the server opens local files only
    inside the one directory holding them all).

    A rescaled image is written as PNG (the authors' encoding). An image the rescale leaves alone decodes to the
    same pixels as the authors' PNG of it (the server converts to RGB, as the authors' server did), so it is sent
    as published: its file hard-linked (copied across file systems), or the dataset's encoded bytes. That keeps
    the disk cost of a full run near the datasets' own size instead of a PNG of every high-resolution photo."""
    image, rescaled = load_image(sample, min_pixels, max_pixels)
    if rescaled:
        path = image_dir / f"{index:06d}.png"
        write_png(image, path)
    elif sample.image.path is not None:
        path = image_dir / f"{index:06d}{sample.image.path.suffix.lower()}"
        link_or_copy(sample.image.path, path)
    else:
        path = image_dir / f"{index:06d}.{(image.format or 'img').lower()}"
        write_bytes_atomic(path, sample.image.data, fsync=False)
    return str(path.resolve())


def byob_rows(samples: list[SuiteSample], image_dir: Path, min_pixels: int, max_pixels: int) -> list[dict]:
    """BYOB dataset rows (id, image_url, question, answer); images that need it are written under image_dir."""
    image_dir.mkdir(parents=True, exist_ok=True)
    return [{"id": s.id, "image_url": image_url(s, i, image_dir, min_pixels, max_pixels), "question": s.question,
             "answer": s.answer} for i, s in enumerate(samples)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    """JSON lines, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"),
                       fsync=False)
