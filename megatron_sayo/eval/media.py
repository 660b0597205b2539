"""Images named by a client, opened under the server's media policy.

A request may carry an image as a base64 data URL (always accepted) or as a local path / file:// URL. Local
media are OFF unless the server was started with `--allowed-local-media-path DIR` (vLLM's flag): then a path
(relative ones are taken relative to DIR) is opened only if, after resolving every symlink and `..`, it is a
regular file inside DIR. Every refused path gets the same message, whatever the reason (off, outside, missing,
unreadable), so the server is no oracle for which files exist. Remote URLs are never fetched.

Before any pixel is decoded, the header's width x height is checked against `max_image_pixels` (a 21 KB PNG
can declare 13000 x 13000 pixels: 0.5 GB decoded). Decoded images are turned upright by their EXIF orientation
and converted to RGB, as transformers' `load_image` does (the data loader opens files the same way).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from megatron_sayo.eval.errors import ApiError

REFUSED = ("local image path refused: this server opens local files only inside the directory given by "
           "--allowed-local-media-path, and only existing readable files there; send the image as a base64 data "
           "URL instead")


@dataclass(frozen=True)
class MediaPolicy:
    """Where local images may come from (None: nowhere) and the largest image header accepted."""

    allowed_local_dir: Path | None = None
    max_image_pixels: int = 4 * 28 * 28 * 1280

    def __post_init__(self):
        if self.allowed_local_dir is not None:
            object.__setattr__(self, "allowed_local_dir", Path(self.allowed_local_dir).resolve(strict=True))
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")


def confined_path(name: str, allowed: Path | None, param: str) -> Path:
    """The real path of a client-named local file, if it is a regular file inside `allowed`; else ApiError."""
    if allowed is None or not name or "\x00" in name:
        raise ApiError(REFUSED, param, "invalid_image")
    try:
        real = (allowed / name).resolve(strict=True)      # an absolute `name` replaces `allowed`
    except (OSError, RuntimeError):
        raise ApiError(REFUSED, param, "invalid_image") from None
    if not real.is_relative_to(allowed) or not real.is_file() or not os.access(real, os.R_OK):
        raise ApiError(REFUSED, param, "invalid_image")
    return real


def open_source(url: str, policy: MediaPolicy, param: str):
    """A readable source (BytesIO or Path) for a data URL, file:// URL or local path."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError("image data URLs must be base64 encoded (data:image/...;base64,...)", param,
                           "invalid_image")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(f"image data URL is not valid base64: {exc}", param, "invalid_image") from None
    if url.startswith(("http://", "https://")):
        raise ApiError("remote image URLs are not fetched by this server: send a base64 data URL", param,
                       "invalid_image")
    return confined_path(url.removeprefix("file://"), policy.allowed_local_dir, param)


def load_image(url, policy: MediaPolicy, param: str) -> Image.Image:
    """A data URL, file:// URL or local path -> RGB PIL image under `policy`; ApiError if refused or unreadable."""
    if not isinstance(url, str) or not url:
        raise ApiError("image_url.url must be a non-empty string", param, "invalid_image")
    source = open_source(url, policy, param)
    try:
        with Image.open(source) as im:
            w, h = im.size                              # from the header: nothing decoded yet
            if w * h > policy.max_image_pixels:
                raise ApiError(f"image of {w}x{h} = {w * h} pixels exceeds the server's limit of "
                               f"{policy.max_image_pixels} (--max-image-pixels)", param, "image_too_large")
            return ImageOps.exif_transpose(im).convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError:      # PIL's own header check (2 x its global limit) came first
        raise ApiError(f"image header declares more pixels than the server's limit of {policy.max_image_pixels} "
                       f"(--max-image-pixels)", param, "image_too_large") from None
    except PermissionError:
        raise ApiError(REFUSED, param, "invalid_image") from None
    except (OSError, ValueError) as exc:
        raise ApiError(f"could not decode image: {exc}", param, "invalid_image") from None
