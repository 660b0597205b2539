"""Planning byte moves between checkpoints: a chunk of a tensor as a rectangle of its matrix view, and the
pieces of HF tensors' rows that fill it (both conversion directions and the LoRA export use these)."""

from __future__ import annotations

import math

from megatron_sayo.formats.tensor_copy import Piece, StoredMatrix
from megatron_sayo.models.qwen25vl.name_map import RowSpan


def rectangle(offsets: tuple[int, ...], sizes: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(row, col, rows, cols) of a chunk of a tensor of `shape` seen as a matrix (as_matrix); a chunk may cut
    dims 0 and 1 only."""
    if len(shape) == 1:
        return offsets[0], 0, sizes[0], 1
    rest = math.prod(shape[2:])
    if any(offsets[2:]) or tuple(sizes[2:]) != tuple(shape[2:]):
        raise ValueError(f"chunk {list(sizes)} at {list(offsets)} of {list(shape)} cuts a dim after the second")
    return offsets[0], offsets[1] * rest, sizes[0], sizes[1] * rest


def span_pieces(spans: list[RowSpan], sources: list[StoredMatrix | None], row: int, col: int, rows: int,
                cols: int) -> list[tuple[int | None, Piece]]:
    """(source index, piece) filling rows x cols of a TP=1 tensor from (row, col), whose rows are `spans`."""
    out, pos = [], 0
    for s in spans:
        a, b = max(pos, row), min(pos + s.rows, row + rows)
        if a < b:
            src = sources[s.source] if s.source is not None else None
            out.append((s.source, Piece(src, s.start + a - pos, col, a - row, 0, b - a, cols)))
        pos += s.rows
    return out

