"""Bounding boxes -> region token positions for Qwen2.5-VL (docs/spec.md §2).

Conventions, stated once:

* A box is (x1, y1, x2, y2) in pixels of the original image, x to the right,
  y downward, and is the closed-open rectangle [x1, x2) x [y1, y2).
* The resized image (W', H') is split into a merge grid of (rows, cols) cells,
  each W'/cols by H'/rows pixels (28 x 28 for Qwen2.5-VL). Cell (r, c) is
  [c*cw, (c+1)*cw) x [r*ch, (r+1)*ch); token k of the image is cell
  (k // cols, k % cols).
* The box is scaled by (W'/W, H'/H) and clamped to [0, W'] x [0, H'].
* A box *touches* a cell when their intersection has positive area. A box
  edge lying exactly on a cell boundary therefore does not pull in the
  neighbouring cell: [0, 0, 28, 28] on an unscaled image is exactly cell 0.
  In columns: c from floor(x1'/cw) to ceil(x2'/cw) - 1 (the same for rows).
* A box with zero area after clamping (outside the image, or degenerate) is
  a data error: `RegionError` naming the sample id.

Arithmetic is exact (fractions), so boundaries never flip by rounding.
The grid always comes from `image_grid_thw` (h / merge, w / merge), or from
`smart_resize` for an image not yet processed, never from a fixed pitch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from megatron_sayo.data.image_processing import smart_resize
from megatron_sayo.models.qwen25vl.rope import tokens_per_image

Box = Sequence[float]


class RegionError(ValueError):
    """A box that yields no region tokens (empty after clamping), or an inconsistent region request."""


@dataclass(frozen=True)
class RegionSpec:
    """One sample's region: its boxes, the original (W, H) of the image they refer to, and which image."""

    boxes: Sequence[Box]
    orig_size: tuple[int, int]
    image_index: int = 0
    sample_id: str = ""


# ---------------------------------------------------------------- grids


def merge_grid_from_thw(thw: Sequence[int], merge_size: int = 2) -> tuple[int, int]:
    """(rows, cols) of LLM tokens for one image from its image_grid_thw row (t, h, w) in patches."""
    t, h, w = (int(v) for v in thw)
    if t != 1:
        raise RegionError(f"regions are defined for still images (grid t = 1), got image_grid_thw {list(thw)}")
    if h % merge_size or w % merge_size:
        raise RegionError(f"image_grid_thw {list(thw)} is not divisible by spatial merge size {merge_size}")
    return h // merge_size, w // merge_size


def resized_size_from_thw(thw: Sequence[int], patch_size: int = 14) -> tuple[int, int]:
    """(W', H') in pixels of the resized image from its image_grid_thw row (t, h, w)."""
    return int(thw[2]) * patch_size, int(thw[1]) * patch_size


def image_grid(orig_size: tuple[int, int], factor: int = 28, min_pixels: int = 56 * 56,
               max_pixels: int = 28 * 28 * 1280) -> tuple[tuple[int, int], tuple[int, int]]:
    """((W', H'), (rows, cols)) for an original (W, H), derived from smart_resize with these bounds."""
    width, height = orig_size
    h_res, w_res = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (w_res, h_res), (h_res // factor, w_res // factor)


# ---------------------------------------------------------------- box -> cells


def _cell_span(lo: Fraction, hi: Fraction, n_cells: int) -> range:
    """Cells i with [i, i+1) meeting (lo, hi) in positive length; lo, hi in cell units, already clamped."""
    return range(math.floor(lo), min(n_cells, math.ceil(hi)))


def _clamped_box_in_cells(box: Box, orig_size: tuple[int, int], resized_size: tuple[int, int],
                          merge_grid: tuple[int, int]) -> tuple[Fraction, Fraction, Fraction, Fraction]:
    """Box scaled to the resized image, clamped to it, and expressed in cell units (x1, y1, x2, y2)."""
    (width, height), (w_res, h_res), (rows, cols) = orig_size, resized_size, merge_grid

    def to_cells(v: float, orig: int, resized: int, n_cells: int) -> Fraction:
        scaled = Fraction(v) * Fraction(resized, orig)
        return min(max(scaled, Fraction(0)), Fraction(resized)) / Fraction(resized, n_cells)

    x1, y1, x2, y2 = box
    return (to_cells(x1, width, w_res, cols), to_cells(y1, height, h_res, rows),
            to_cells(x2, width, w_res, cols), to_cells(y2, height, h_res, rows))


def box_to_cells(box: Box, orig_size: tuple[int, int], resized_size: tuple[int, int],
                 merge_grid: tuple[int, int], sample_id: str = "") -> list[int]:
    """Sorted token indices k = r * cols + c of every cell the box touches (see module docstring)."""
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise RegionError(f"sample {sample_id!r}: box must be 4 finite numbers [x1, y1, x2, y2], got {list(box)}")
    x1, y1, x2, y2 = _clamped_box_in_cells(box, orig_size, resized_size, merge_grid)
    if x2 <= x1 or y2 <= y1:
        raise RegionError(f"sample {sample_id!r}: box {list(box)} is empty after clamping to the image "
                          f"{orig_size[0]}x{orig_size[1]} (outside the image or zero area)")
    rows, cols = merge_grid
    return [r * cols + c for r in _cell_span(y1, y2, rows) for c in _cell_span(x1, x2, cols)]


def boxes_to_cells(boxes: Sequence[Box], orig_size: tuple[int, int], resized_size: tuple[int, int],
                   merge_grid: tuple[int, int], sample_id: str = "") -> list[int]:
    """Sorted union of box_to_cells over several boxes; no boxes at all is a RegionError."""
    if not boxes:
        raise RegionError(f"sample {sample_id!r}: no boxes, the region would be empty")
    cells: set[int] = set()
    for box in boxes:
        cells.update(box_to_cells(box, orig_size, resized_size, merge_grid, sample_id))
    return sorted(cells)


# ---------------------------------------------------------------- cells -> sequence positions


def image_token_starts(input_ids_row: Sequence[int] | torch.Tensor, image_token_id: int,
                       tokens_per_image: Sequence[int] | None = None) -> list[int]:
    """Position of each image's first image_pad token in one row.

    Without `tokens_per_image` each maximal run of image_pad tokens is one image;
    with it (from image_grid_thw) the pads are cut into images by count, which
    also checks that the row holds exactly those images.
    """
    ids = torch.as_tensor(input_ids_row).reshape(-1)
    pad_pos = torch.nonzero(ids == image_token_id).reshape(-1).tolist()
    if tokens_per_image is None:
        return [p for i, p in enumerate(pad_pos) if i == 0 or pad_pos[i - 1] != p - 1]
    if sum(tokens_per_image) != len(pad_pos):
        raise RegionError(f"row has {len(pad_pos)} image tokens but image_grid_thw implies "
                          f"{sum(tokens_per_image)} ({list(tokens_per_image)})")
    starts, offset = [], 0
    for n in tokens_per_image:
        block = pad_pos[offset:offset + n]
        if block[-1] - block[0] != n - 1:
            raise RegionError(f"image tokens at positions {block[0]}..{block[-1]} are not contiguous")
        starts.append(block[0])
        offset += n
    return starts


def region_positions(input_ids_row: Sequence[int] | torch.Tensor, image_token_id: int,
                     image_index_in_row: int, cells: Sequence[int],
                     tokens_per_image: Sequence[int] | None = None) -> list[int]:
    """Sequence positions of region cells: start of the chosen image's image_pad block + k."""
    starts = image_token_starts(input_ids_row, image_token_id, tokens_per_image)
    if not 0 <= image_index_in_row < len(starts):
        raise RegionError(f"image index {image_index_in_row} requested but the row holds {len(starts)} image(s)")
    if tokens_per_image is not None and cells and max(cells) >= tokens_per_image[image_index_in_row]:
        raise RegionError(f"cell {max(cells)} is outside image {image_index_in_row} "
                          f"({tokens_per_image[image_index_in_row]} tokens)")
    return [starts[image_index_in_row] + k for k in cells]


def _images_per_row(input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int,
                    merge_size: int) -> list[list[int]]:
    """Indices into image_grid_thw of each row's images, assigned in order by token counts."""
    counts = tokens_per_image(image_grid_thw, merge_size)
    per_row, nxt = [], 0
    for row in input_ids:
        n_pad, mine = int((row == image_token_id).sum()), []
        while n_pad > 0:
            if nxt >= len(counts):
                raise RegionError("input_ids hold more image tokens than image_grid_thw describes")
            n_pad -= counts[nxt]
            mine.append(nxt)
            nxt += 1
        if n_pad < 0:
            raise RegionError(f"image token count of row {len(per_row)} does not match image_grid_thw")
        per_row.append(mine)
    if nxt != len(counts):
        raise RegionError(f"image_grid_thw has {len(counts)} images but input_ids use {nxt}")
    return per_row


def batch_region_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int,
                           specs: Sequence[RegionSpec | None], merge_size: int = 2,
                           patch_size: int = 14) -> list[list[int]]:
    """Per-row region positions for a batch [B, S] (any padding side, several images per row).

    image_grid_thw lists every image of the batch in row order, then order of
    appearance (as the processor emits it). specs[b] = None means no region.
    """
    if input_ids.dim() != 2 or len(specs) != input_ids.shape[0]:
        raise RegionError(f"need input_ids [B, S] and one spec per row, got {tuple(input_ids.shape)} "
                          f"and {len(specs)} specs")
    thw = image_grid_thw.reshape(-1, 3)
    per_row = _images_per_row(input_ids, thw, image_token_id, merge_size)
    out: list[list[int]] = []
    for row, images, spec in zip(input_ids, per_row, specs):
        if spec is None:
            out.append([])
            continue
        if not 0 <= spec.image_index < len(images):
            raise RegionError(f"sample {spec.sample_id!r}: image index {spec.image_index} requested but its "
                              f"row holds {len(images)} image(s)")
        img_thw = thw[images[spec.image_index]].tolist()
        cells = boxes_to_cells(spec.boxes, spec.orig_size, resized_size_from_thw(img_thw, patch_size),
                               merge_grid_from_thw(img_thw, merge_size), spec.sample_id)
        counts = tokens_per_image(thw[images], merge_size)
        out.append(region_positions(row, image_token_id, spec.image_index, cells, counts))
    return out


def positions_to_mask(positions: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """Boolean mask [B, seq_len], True at each row's listed positions."""
    mask = torch.zeros(len(positions), seq_len, dtype=torch.bool)
    for b, pos in enumerate(positions):
        mask[b, list(pos)] = True
    return mask


def batch_region_mask(input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int,
                      specs: Sequence[RegionSpec | None], merge_size: int = 2,
                      patch_size: int = 14) -> torch.Tensor:
    """Boolean region mask [B, S] of batch_region_positions."""
    positions = batch_region_positions(input_ids, image_grid_thw, image_token_id, specs, merge_size, patch_size)
    return positions_to_mask(positions, input_ids.shape[1])
