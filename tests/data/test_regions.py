"""Box -> region token positions: hand-computed cases and a per-pixel rasterisation reference."""

import random

import numpy as np
import pytest
import torch

from megatron_sayo.data.regions import (
    RegionError,
    RegionSpec,
    batch_region_mask,
    batch_region_positions,
    box_to_cells,
    boxes_to_cells,
    image_grid,
    merge_grid_from_thw,
    region_positions,
    resized_size_from_thw,
)

IMG = 9          # image_pad id in these fixtures
VS, VE, PAD = 5, 6, 0


# ---------------------------------------------------------------- box_to_cells, hand-computed


@pytest.mark.parametrize("box,cells", [
    ([0, 0, 28, 28], [0]),            # edges on cell boundaries: exactly cell 0
    ([0, 0, 29, 28], [0, 1]),         # one pixel past the boundary pulls in column 1
    ([28, 28, 56, 56], [3]),
    ([27, 27, 29, 29], [0, 1, 2, 3]),  # straddles the centre
    ([28, 0, 28.5, 0.5], [1]),         # sliver starting on a boundary
    ([0, 0, 56, 56], [0, 1, 2, 3]),
])
def test_box_edges_unscaled_2x2(box, cells):
    assert box_to_cells(box, (56, 56), (56, 56), (2, 2)) == cells


def test_box_scaled_to_resized_image():
    # 100x50 original -> 112x56 resized (scale 1.12 both ways), grid 2 x 4 cells of 28 px.
    assert box_to_cells([0, 0, 25, 25], (100, 50), (112, 56), (2, 4)) == [0]       # -> [0,0,28,28]
    assert box_to_cells([25, 0, 26, 1], (100, 50), (112, 56), (2, 4)) == [1]       # x -> [28, 29.12]
    assert box_to_cells([75, 25, 100, 50], (100, 50), (112, 56), (2, 4)) == [7]    # -> [84,28,112,56]


def test_box_partly_outside_is_clamped():
    assert box_to_cells([-10, -10, 30, 10], (56, 56), (56, 56), (2, 2)) == [0, 1]
    assert box_to_cells([40, 40, 100, 100], (56, 56), (56, 56), (2, 2)) == [3]


@pytest.mark.parametrize("box", [[60, 0, 80, 10], [-20, -20, 0, 0], [10, 10, 10, 20], [0, 56, 56, 70]])
def test_empty_after_clamping_raises_with_sample_id(box):
    with pytest.raises(RegionError, match="sample-42"):
        box_to_cells(box, (56, 56), (56, 56), (2, 2), sample_id="sample-42")


def test_several_boxes_union():
    assert boxes_to_cells([[0, 0, 10, 10], [30, 30, 40, 40]], (56, 56), (56, 56), (2, 2)) == [0, 3]
    assert boxes_to_cells([[0, 0, 30, 10], [20, 0, 40, 10]], (56, 56), (56, 56), (2, 2)) == [0, 1]
    with pytest.raises(RegionError, match="s1"):
        boxes_to_cells([], (56, 56), (56, 56), (2, 2), sample_id="s1")


def test_grid_helpers():
    assert merge_grid_from_thw([1, 8, 12]) == (4, 6)
    assert resized_size_from_thw([1, 8, 12]) == (168, 112)
    # 100x50 -> smart_resize rounds to 112x56 (H, W = 56, 112): 2 rows, 4 cols
    assert image_grid((100, 50)) == ((112, 56), (2, 4))
    with pytest.raises(RegionError):
        merge_grid_from_thw([2, 8, 12])


# ---------------------------------------------------------------- naive rasterisation reference


def naive_cells(box, orig, resized, grid, supersample):
    """Mark fine pixels (1/supersample of a resized pixel) whose centre lies in the scaled box; any marked -> cell."""
    (w, h), (wr, hr), (rows, cols) = orig, resized, grid
    s = supersample
    xs = (np.arange(wr * s) + 0.5) / s            # centres in resized pixels
    ys = (np.arange(hr * s) + 0.5) / s
    x1, y1, x2, y2 = box[0] * wr / w, box[1] * hr / h, box[2] * wr / w, box[3] * hr / h
    inside = ((ys[:, None] >= y1) & (ys[:, None] < y2)) & ((xs[None, :] >= x1) & (xs[None, :] < x2))
    ch, cw = hr * s // rows, wr * s // cols
    touched = inside.reshape(rows, ch, cols, cw).any(axis=(1, 3))
    return [int(k) for k in np.flatnonzero(touched.reshape(-1))]


def test_box_to_cells_matches_pixel_rasterisation():
    rng = random.Random(0)
    # (p, q): resized = orig * p / q; integer boxes scale to multiples of 1/q, so supersample q is exact.
    for p, q in [(1, 1), (2, 1), (1, 2), (2, 3), (3, 2)]:
        for _ in range(40):
            rows, cols = rng.randint(1, 4), rng.randint(1, 4)
            wr, hr = 28 * cols, 28 * rows
            if (wr * q) % p or (hr * q) % p:
                continue
            w, h = wr * q // p, hr * q // p
            x1, y1 = rng.randint(-10, w), rng.randint(-10, h)
            box = [x1, y1, x1 + rng.randint(1, w), y1 + rng.randint(1, h)]
            ref = naive_cells(box, (w, h), (wr, hr), (rows, cols), q)
            if not ref:
                with pytest.raises(RegionError):
                    box_to_cells(box, (w, h), (wr, hr), (rows, cols))
            else:
                assert box_to_cells(box, (w, h), (wr, hr), (rows, cols)) == ref, (box, w, h, p, q)


# ---------------------------------------------------------------- positions in sequences


def test_region_positions_single_row():
    row = [1, 2, VS] + [IMG] * 4 + [VE, 3]       # image pads at 3..6
    assert region_positions(row, IMG, 0, [0, 3]) == [3, 6]
    with pytest.raises(RegionError):
        region_positions(row, IMG, 1, [0])


def _two_image_batch():
    """Row 0: left padded, two images (2x2 then 2x3 tokens). Row 1: right padded, one image (2x2)."""
    row0 = [PAD, PAD, 1, VS] + [IMG] * 4 + [VE, 2, VS] + [IMG] * 6 + [VE, 3]
    row1 = [1, VS] + [IMG] * 4 + [VE, 4] + [PAD] * 11
    assert len(row0) == len(row1) == 19
    thw = torch.tensor([[1, 4, 4], [1, 4, 6], [1, 4, 4]])   # row-major over the batch
    return torch.tensor([row0, row1]), thw


def test_batch_two_images_left_and_right_padding():
    ids, thw = _two_image_batch()
    specs = [
        # second image of row 0: 84x56 px resized = original; box = bottom-right cell (row 1, col 2) -> k = 5
        RegionSpec(boxes=[[56, 28, 84, 56]], orig_size=(84, 56), image_index=1, sample_id="a"),
        # first (default) image of row 1: top row of a 56x56 image -> k = 0, 1
        RegionSpec(boxes=[[0, 0, 56, 10]], orig_size=(56, 56), sample_id="b"),
    ]
    # row 0: image B's pads start at position 11 -> 11 + 5 = 16; row 1: image pads start at 2.
    assert batch_region_positions(ids, thw, IMG, specs) == [[16], [2, 3]]
    mask = batch_region_mask(ids, thw, IMG, specs)
    expected = torch.zeros(2, 19, dtype=torch.bool)
    expected[0, 16] = expected[1, 2] = expected[1, 3] = True
    assert torch.equal(mask, expected)


def test_batch_default_first_image_and_none_rows():
    ids, thw = _two_image_batch()
    specs = [RegionSpec(boxes=[[0, 28, 28, 56]], orig_size=(56, 56), sample_id="a"), None]
    assert batch_region_positions(ids, thw, IMG, specs) == [[4 + 2], []]   # image A at 4, cell (1,0) -> k=2


def test_batch_grid_comes_from_thw_not_a_fixed_pitch():
    # original 200x100 resized to 56x28 px (thw 1,2,4): a box over the right half is cell 1 of 1x2.
    ids = torch.tensor([[VS, IMG, IMG, VE]])
    specs = [RegionSpec(boxes=[[100, 0, 200, 100]], orig_size=(200, 100), sample_id="x")]
    assert batch_region_positions(ids, torch.tensor([[1, 2, 4]]), IMG, specs) == [[2]]


def test_batch_errors_name_the_sample():
    ids, thw = _two_image_batch()
    bad_box = [RegionSpec(boxes=[[90, 0, 99, 10]], orig_size=(84, 56), image_index=1, sample_id="far-away"), None]
    with pytest.raises(RegionError, match="far-away"):
        batch_region_positions(ids, thw, IMG, bad_box)
    bad_index = [None, RegionSpec(boxes=[[0, 0, 5, 5]], orig_size=(56, 56), image_index=1, sample_id="b")]
    with pytest.raises(RegionError, match="'b'.*image index 1"):
        batch_region_positions(ids, thw, IMG, bad_index)
    with pytest.raises(RegionError, match="image_grid_thw"):
        batch_region_positions(ids, thw[:2], IMG, [None, None])
