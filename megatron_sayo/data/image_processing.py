"""Qwen2.5-VL image preprocessing in-tree: smart_resize, normalisation and patchify (no torchvision).

`process_images` reproduces transformers' Qwen2-VL image processor (PIL backend) exactly: convert to RGB
(alpha composited on white), PIL bicubic resize to the `smart_resize` target, rescale in float64 then
float32, normalise in float32, and patchify with rows ordered merge-block major (4 consecutive rows form
one LLM token when merge_size = 2). A still image is repeated over `temporal_patch_size` frames, grid_t = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from megatron_sayo.formats.jsonfiles import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio must be <= {MAX_ASPECT_RATIO}, got {height}x{width} "
                         f"({max(height, width) / min(height, width):.1f})")
    # A side shorter than factor/2 rounds to 0; the area test below then scales it up (as transformers does).
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ImageProcessorConfig:
    """The numbers of a preprocessor_config.json that decide pixel_values and image_grid_thw."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    source: str = field(default="<defaults>", compare=False)

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merged LLM token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P."""
        return len(self.image_mean) * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_dict(cls, raw: dict, source: str = "preprocessor_config.json") -> ImageProcessorConfig:
        """Read and validate a preprocessor_config dict; `source` names the file in errors."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        size = raw.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(f"{source}: field 'size' must be an object with shortest_edge/longest_edge, got {size!r}")
        d = cls()
        # min_pixels / max_pixels win over size{} (transformers' rule); size{} may also use min/max_pixels keys.
        min_px = _first(raw, ("min_pixels",), size, ("shortest_edge", "min_pixels"), d.min_pixels)
        max_px = _first(raw, ("max_pixels",), size, ("longest_edge", "max_pixels"), d.max_pixels)
        cfg = cls(
            min_pixels=_pos_int(min_px, "min_pixels", source),
            max_pixels=_pos_int(max_px, "max_pixels", source),
            patch_size=_pos_int(raw.get("patch_size", d.patch_size), "patch_size", source),
            temporal_patch_size=_pos_int(raw.get("temporal_patch_size", d.temporal_patch_size),
                                         "temporal_patch_size", source),
            merge_size=_pos_int(raw.get("merge_size", d.merge_size), "merge_size", source),
            image_mean=_triple(raw.get("image_mean", d.image_mean), "image_mean", source),
            image_std=_triple(raw.get("image_std", d.image_std), "image_std", source, positive=True),
            rescale_factor=_pos_float(raw.get("rescale_factor", d.rescale_factor), "rescale_factor", source),
            do_resize=_bool(raw.get("do_resize", True), "do_resize", source),
            do_rescale=_bool(raw.get("do_rescale", True), "do_rescale", source),
            do_normalize=_bool(raw.get("do_normalize", True), "do_normalize", source),
            do_convert_rgb=_bool(raw.get("do_convert_rgb", True), "do_convert_rgb", source),
            resample=_resample(raw.get("resample", d.resample), source),
            source=source,
        )
        if cfg.min_pixels > cfg.max_pixels:
            raise ValueError(f"{source}: min_pixels ({cfg.min_pixels}) must be <= max_pixels ({cfg.max_pixels})")
        if not cfg.do_resize:
            raise ValueError(f"{source}: do_resize=false is not supported: Qwen2.5-VL needs sides that are "
                             f"multiples of patch_size*merge_size")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> ImageProcessorConfig:
        """Load a preprocessor_config.json file, or a checkpoint directory in any layout transformers writes:
        preprocessor_config.json (4.x) or processor_config.json with the settings under "image_processor" (5.x)."""
        path = Path(path)
        if not path.is_dir():
            return cls.from_dict(read_json(path, "a preprocessor_config.json"), source=str(path))
        legacy, combined = path / "preprocessor_config.json", path / "processor_config.json"
        if legacy.is_file():
            return cls.from_dict(read_json(legacy, "a preprocessor_config.json"), source=str(legacy))
        if combined.is_file():
            raw = read_json(combined, "a processor_config.json")
            inner = raw.get("image_processor") if isinstance(raw, dict) else None
            if not isinstance(inner, dict):
                raise ValueError(f"{combined}: field 'image_processor' must be an object with the image processor "
                                 f"settings (transformers 5.x layout), got {inner!r}")
            return cls.from_dict(inner, source=f"{combined}: image_processor")
        raise FileNotFoundError(f"{path}: no preprocessor_config.json (transformers 4.x) or processor_config.json "
                                f"(5.x): the checkpoint has no image processor settings")

    def to_dict(self) -> dict:
        """The preprocessor_config.json content for this config (hub field names)."""
        return {
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor, "do_resize": self.do_resize, "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize, "do_convert_rgb": self.do_convert_rgb, "resample": self.resample,
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        }


def _first(raw: dict, keys: tuple, size: dict, size_keys: tuple, default):
    """First present value among raw[keys], then size[size_keys], else default."""
    for k in keys:
        if raw.get(k) is not None:
            return raw[k]
    for k in size_keys:
        if size.get(k) is not None:
            return size[k]
    return default


def _pos_int(value, name: str, source: str) -> int:
    """A positive int field (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
    return value


def _pos_float(value, name: str, source: str) -> float:
    """A positive number field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{source}: field '{name}' must be a positive number, got {value!r}")
    return float(value)


def _triple(value, name: str, source: str, positive: bool = False) -> tuple[float, ...]:
    """A list of 3 numbers (one per RGB channel)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or not positive) for v in value)
    if not ok:
        kind = "positive numbers" if positive else "numbers"
        raise ValueError(f"{source}: field '{name}' must be a list of 3 {kind} (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)


def _bool(value, name: str, source: str) -> bool:
    """A boolean field."""
    if not isinstance(value, bool):
        raise ValueError(f"{source}: field '{name}' must be true or false, got {value!r}")
    return value


def _resample(value, source: str) -> int:
    """A PIL resampling filter id (3 = bicubic, the Qwen2-VL default)."""
    valid = {int(r) for r in Image.Resampling}
    if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
        raise ValueError(f"{source}: field 'resample' must be a PIL resampling id in {sorted(valid)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------- images

EXIF_ORIENTATION = 0x0112


def open_upright(src) -> Image.Image:
    """An image file (path or binary stream) decoded and turned upright by its EXIF orientation, as
    transformers' `load_image` does (PIL.ImageOps.exif_transpose); its mode is left as stored."""
    with Image.open(src) as f:
        f.load()
        return ImageOps.exif_transpose(f)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(W, H) of an opened image once its EXIF orientation is applied (orientations 5-8 swap the sides)."""
    w, h = image.size
    return (h, w) if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def load_image(image: Image.Image | str | Path, name: str) -> Image.Image:
    """A decoded PIL image from a PIL image or a file path (a file is opened as transformers' processors open a
    path, with its `load_image`: upright by its EXIF orientation, then RGB); clear error naming the image otherwise."""
    if isinstance(image, (str, Path)):
        try:
            return open_upright(image).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{name}: cannot read image file {image}: {exc}") from None
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL.Image.Image or a file path, got {type(image).__name__}")
    try:
        image.load()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: cannot decode image data: {exc}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparency is composited onto a white background."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def image_target_size(width: int, height: int, cfg: ImageProcessorConfig, name: str = "image") -> tuple[int, int]:
    """(resized_height, resized_width) for an image of this size; errors name the image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{name}: image has zero size ({width}x{height} pixels)")
    try:
        return smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def normalize_pixels(rgb: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """uint8 HWC -> float32 CHW, rescaled (float64 product, then float32) and normalised in float32."""
    x = rgb.transpose(2, 0, 1)
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale else x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def patchify(chw: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """float32 CHW -> ([grid_h*grid_w, C*T*P*P] rows in merge-block-major order, grid_h, grid_w)."""
    c, h, w = chw.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                       # (gh/m, gw/m, m, m, C, P, P)
    x = np.repeat(x[:, :, :, :, :, None], t, axis=5)          # still image: T identical frames
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), gh, gw


def process_image(image: Image.Image | str | Path, cfg: ImageProcessorConfig,
                  name: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel rows float32 [grid_h*grid_w, C*T*P*P], (1, grid_h, grid_w))."""
    img = load_image(image, name)
    h_res, w_res = image_target_size(img.width, img.height, cfg, name)
    img = to_rgb(img) if cfg.do_convert_rgb else img
    if img.mode != "RGB":
        raise ValueError(f"{name}: mode {img.mode} is not RGB and do_convert_rgb is false in {cfg.source}")
    img = img.resize((w_res, h_res), resample=cfg.resample)
    rows, gh, gw = patchify(normalize_pixels(np.asarray(img), cfg), cfg)
    return rows, (1, gh, gw)


def process_images(images: list, cfg: ImageProcessorConfig,
                   names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values float32 [N, C*T*P*P], image_grid_thw int64 [n_images, 3]), as transformers."""
    names = names or [_image_name(img, i) for i, img in enumerate(images)]
    rows, grids = [], []
    for img, name in zip(images, names, strict=True):
        r, thw = process_image(img, cfg, name)
        rows.append(r)
        grids.append(thw)
    pixel_values = np.concatenate(rows) if rows else np.zeros((0, cfg.patch_dim), np.float32)
    return torch.from_numpy(pixel_values), torch.tensor(grids, dtype=torch.long).reshape(-1, 3)


def _image_name(image, index: int) -> str:
    """Human name of an image for errors: 'image 3 (file.png)' when it knows its file."""
    path = "" if isinstance(image, (str, Path)) else getattr(image, "filename", "")
    return f"image {index} ({path})" if path else f"image {index}"
