"""Image preprocessing vs transformers' Qwen2VLImageProcessorPil (the reference); equality is exact (tol 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as ref_mod

from megatron_sayo.data.image_processing import ImageProcessorConfig, process_images, smart_resize

SMALL = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 80}


def reference(images, **kwargs):
    """transformers' pixel_values and image_grid_thw for these images."""
    out = ref_mod.Qwen2VLImageProcessorPil(**kwargs)(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def assert_same(images, cfg, **ref_kwargs):
    """Our (pixel_values, image_grid_thw) equal the reference's bit for bit."""
    pv, grid = process_images(images, cfg)
    ref_pv, ref_grid = reference(images, **ref_kwargs)
    assert pv.dtype == torch.float32 and grid.dtype == torch.int64
    assert torch.equal(grid, ref_grid)
    assert pv.shape == ref_pv.shape
    assert torch.equal(pv, ref_pv), f"max abs diff {(pv - ref_pv).abs().max()}"


@pytest.mark.parametrize("w,h", [
    (97, 61),     # odd sizes, rounded to multiples of 28
    (33, 517),    # tall, odd
    (1000, 700),  # hits max_pixels: scaled down
    (10, 13),     # below min_pixels: scaled up
    (5, 300),     # a side below factor/2 rounds to 0 first, then is scaled up
    (56, 84),     # already multiples of 28
])
def test_single_image_matches_transformers(make_image, w, h):
    cfg = ImageProcessorConfig.from_dict(SMALL)
    assert_same([make_image(w, h, seed=w + h)], cfg, **SMALL)


def test_max_and_min_pixel_bounds_are_hit(make_image):
    cfg = ImageProcessorConfig.from_dict(SMALL)
    _, grid = process_images([make_image(1000, 700), make_image(10, 13)], cfg)
    pixels = (grid[:, 1] * grid[:, 2] * 14 * 14).tolist()
    assert pixels[0] <= SMALL["max_pixels"] < 1000 * 700
    assert pixels[1] >= SMALL["min_pixels"] > 10 * 13


def test_several_images_and_modes(make_image):
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (45, 71), dtype=np.uint8), "L")
    pal = make_image(60, 30, seed=2).convert("P")
    pal.info["transparency"] = 0
    images = [make_image(97, 61), rgba, gray, pal, make_image(300, 30, seed=3)]
    assert_same(images, ImageProcessorConfig.from_dict(SMALL), **SMALL)


def test_default_config_matches_transformers_defaults(make_image):
    assert_same([make_image(300, 211, seed=5)], ImageProcessorConfig())


def test_non_default_normalisation_and_rescale(make_image):
    raw = {**SMALL, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4], "rescale_factor": 1 / 127.0}
    cfg = ImageProcessorConfig.from_dict(raw)
    assert_same([make_image(83, 47, seed=7)], cfg, **raw)


def test_checkpoint_preprocessor_config_matches_reference_loader(tiny_ckpt, make_image):
    cfg = ImageProcessorConfig.from_json(tiny_ckpt)
    ref = ref_mod.Qwen2VLImageProcessorPil.from_pretrained(tiny_ckpt)
    images = [make_image(123, 45, seed=1), make_image(64, 64, seed=2)]
    out = ref(images=images, return_tensors="pt")
    pv, grid = process_images(images, cfg)
    assert torch.equal(grid, out["image_grid_thw"]) and torch.equal(pv, out["pixel_values"])


def test_smart_resize_equals_transformers():
    for h in (1, 13, 14, 15, 27, 28, 29, 100, 333, 1000, 4000):
        for w in (1, 14, 15, 57, 200, 999, 3000):
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in ((56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 80)):
                assert smart_resize(h, w, 28, lo, hi) == ref_mod.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_empty_image_list(make_image):
    pv, grid = process_images([], ImageProcessorConfig())
    assert pv.shape == (0, 3 * 2 * 14 * 14) and grid.shape == (0, 3)


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("field,value,expect", [
    ("min_pixels", -1, "positive integer"),
    ("max_pixels", "big", "positive integer"),
    ("patch_size", 0, "positive integer"),
    ("image_mean", [0.5, 0.5], "list of 3"),
    ("image_std", [0.5, 0.0, 0.5], "list of 3 positive"),
    ("rescale_factor", 0, "positive number"),
    ("do_normalize", "yes", "true or false"),
    ("resample", 99, "resampling"),
])
def test_bad_config_field_names_file_and_field(tmp_path, field, value, expect):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**SMALL, field: value}))
    with pytest.raises(ValueError) as exc:
        ImageProcessorConfig.from_json(tmp_path)
    assert str(path) in str(exc.value) and field in str(exc.value) and expect in str(exc.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_json(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageProcessorConfig.from_json(tmp_path)
    with pytest.raises(ValueError, match="min_pixels .* <= max_pixels"):
        ImageProcessorConfig.from_dict({"min_pixels": 100, "max_pixels": 10}, "x.json")


def test_size_dict_and_override():
    cfg = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 1000}})
    assert (cfg.min_pixels, cfg.max_pixels) == (100, 1000)
    cfg = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 1000}, "max_pixels": 500})
    assert cfg.max_pixels == 500


def test_bad_images_name_the_image(tmp_path, make_image):
    cfg = ImageProcessorConfig.from_dict(SMALL)
    with pytest.raises(ValueError, match=r"image 1: image has zero size \(0x5"):
        process_images([make_image(30, 30), Image.new("RGB", (0, 5))], cfg)
    with pytest.raises(ValueError, match=r"image 0: image aspect ratio must be <= 200"):
        process_images([make_image(402, 2)], cfg)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"image 0: cannot read image file .*broken.png"):
        process_images([bad], cfg)
    with pytest.raises(TypeError, match="image 0: expected a PIL.Image.Image"):
        process_images([np.zeros((4, 4, 3))], cfg)


def test_image_paths_are_accepted(tmp_path, make_image):
    img = make_image(77, 41, seed=9)
    img.save(tmp_path / "a.png")
    cfg = ImageProcessorConfig.from_dict(SMALL)
    pv, grid = process_images([tmp_path / "a.png"], cfg)
    ref_pv, ref_grid = reference([img], **SMALL)
    assert torch.equal(pv, ref_pv) and torch.equal(grid, ref_grid)


# ------------------------------------------------------------------ files as transformers' load_image opens them

def exif_jpeg(path, image, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif)


def odd_files(tmp_path, make_image) -> dict:
    """Files of the 8 EXIF orientations (a 64x32 JPEG each) and of odd modes: palette (with and without a
    transparent index), CMYK JPEG, 16-bit grey PNG, RGBA and LA PNGs."""
    rng = np.random.default_rng(4)
    base = make_image(64, 32, seed=11)
    files = {}
    for k in range(1, 9):
        files[f"orientation-{k}"] = path = tmp_path / f"o{k}.jpg"
        exif_jpeg(path, base, k)
    pal = make_image(50, 30, seed=3).convert("P")
    pal.save(files.setdefault("palette", tmp_path / "p.png"))
    pal.save(files.setdefault("palette-transparent", tmp_path / "pt.png"), transparency=0)
    base.convert("CMYK").save(files.setdefault("cmyk", tmp_path / "c.jpg"), "JPEG", quality=95)
    Image.fromarray(rng.integers(0, 65536, (30, 45), dtype=np.uint16)).save(
        files.setdefault("grey16", tmp_path / "g.png"))
    Image.fromarray(rng.integers(0, 256, (30, 45, 4), dtype=np.uint8), "RGBA").save(
        files.setdefault("rgba", tmp_path / "a.png"))
    Image.fromarray(rng.integers(0, 256, (30, 45, 2), dtype=np.uint8), "LA").save(
        files.setdefault("la", tmp_path / "la.png"))
    return files


def test_files_equal_transformers_load_image_then_processor(tmp_path, make_image):
    """Issue 29 item 4: every entry point that opens an image file (the server's media loader from a data URL and
    from a local path, the data loader's samples, process_images given a path) gives the pixels and grid of
    transformers' `load_image` + Qwen2VLImageProcessorPil: EXIF orientation applied (a 64x32 image with
    orientation 6 is 32 wide, 64 high), palette, CMYK, 16-bit and transparent images converted the same way."""
    import base64

    from transformers.image_utils import load_image as hf_load_image

    from megatron_sayo.data.grounded import validate_row
    from megatron_sayo.eval.media import MediaPolicy
    from megatron_sayo.eval.media import load_image as serve_image

    cfg = ImageProcessorConfig.from_dict(SMALL)
    files = odd_files(tmp_path, make_image)
    for name, path in files.items():
        ref_image = hf_load_image(str(path))
        ref_pv, ref_grid = reference([ref_image], **SMALL)
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        row = {"id": name, "image": str(path), "question": "q", "answer": "a",
               "boxes": [[0, 0, ref_image.width, ref_image.height]]}
        sample = validate_row(row, tmp_path)
        assert sample.image_size == ref_image.size, name
        opened = {"data-url": serve_image(url, MediaPolicy(), "image"),
                  "local-path": serve_image(path.name, MediaPolicy(tmp_path), "image"),
                  "data-loader": sample.open_image(), "path": path}
        for how, image in opened.items():
            pv, grid = process_images([image], cfg)
            assert torch.equal(grid, ref_grid), (name, how, grid, ref_grid)
            assert torch.equal(pv, ref_pv), (name, how)
    assert hf_load_image(str(files["orientation-6"])).size == (32, 64)


def test_training_loader_feeds_upright_pixels_and_regions(tiny_ckpt, tmp_path, make_image):
    """Issue 29 item 4, the data loader end to end: rows read by load_grounded from a JSONL file (image by path)
    and from a parquet file (image bytes embedded, as HF datasets store them) and batched by the trainer's
    build_prompt_batch get the pixel_values and image_grid_thw of transformers' `load_image` +
    Qwen2VLImageProcessorPil on the tiny checkpoint's bounds, and their boxes, drawn on the upright image, select
    the upright image's cells. Stored 112x56 with orientation 6 (8), upright 56x112: a 4 x 2 cell grid, no resize;
    the box [28, 84, 56, 112] is the bottom-right cell, token 7 of the image (outside the stored 112x56 image)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers.image_utils import load_image as hf_load_image

    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
    from megatron_sayo.rl.prompts import build_prompt_batch

    box = [28, 84, 56, 112]
    rows = []
    for k in (6, 8):
        exif_jpeg(tmp_path / f"o{k}.jpg", make_image(112, 56, seed=k), k)
        rows.append({"id": f"o{k}", "image": f"o{k}.jpg", "question": "q", "answer": "a", "boxes": [box]})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(
        [{**r, "image": {"bytes": (tmp_path / r["image"]).read_bytes(), "path": None}} for r in rows]),
        tmp_path / "data.parquet")

    pre = json.loads((tiny_ckpt / "preprocessor_config.json").read_text())
    bounds = {k: pre[k] for k in ("min_pixels", "max_pixels")}
    ref_pv, ref_grid = reference([hf_load_image(str(tmp_path / r["image"])) for r in rows], **bounds)
    assert ref_grid.tolist() == [[1, 8, 4], [1, 8, 4]]                 # upright: 112 high, 56 wide
    hf = load_hf_config(tiny_ckpt)
    proc = Processor.from_pretrained(tiny_ckpt)
    for name in ("data.jsonl", "data.parquet"):
        samples = load_grounded(tmp_path / name)
        assert [s.image_size for s in samples] == [(56, 112), (56, 112)], name
        batch = build_prompt_batch(proc, samples, hf.tokens.image, hf.vision.spatial_merge_size,
                                   hf.vision.patch_size, "")
        assert torch.equal(batch.inputs["image_grid_thw"], ref_grid), name
        assert torch.equal(batch.inputs["pixel_values"], ref_pv), name
        for row in range(2):
            first_pad = int((batch.inputs["input_ids"][row] == hf.tokens.image).nonzero()[0])
            assert batch.region_mask[row].nonzero().flatten().tolist() == [first_pad + 7], (name, row)
