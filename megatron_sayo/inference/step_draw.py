"""What the sampler shares with the other pipeline stages each decode step: the StepDraw (ids, log-probs and the
optional capture and top-k fields, by name), its flat float64 layout for the PP broadcast and the rebuild.

`draw_layout` is the one place that knows the order of the rows in the flat tensor. float64 holds every id
and float32 value exactly, so a draw comes back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sayo.inference.parallel import share_from_sampler

_IDS = ("ids", "top_ids")                    # long fields; the others are float32
_PER_CHOICE = ("top_ids", "top_logprobs")    # [n, k] fields; the others are [n]


@dataclass
class StepDraw:
    """One decode step's draw for n rows."""

    ids: torch.Tensor                              # [n] long: the sampled tokens
    logprobs: torch.Tensor                         # [n] log p under the sampling distribution (see sampling.py)
    capture_logprobs: torch.Tensor | None = None   # [n] log p under softmax(logits / T), full vocab (capture)
    entropy: torch.Tensor | None = None            # [n] entropy of that distribution (capture)
    raw_logprobs: torch.Tensor | None = None       # [n] log softmax(raw logits) of the ids (top_logprobs asked)
    top_ids: torch.Tensor | None = None            # [n, k] long: the k most likely ids under the raw logits
    top_logprobs: torch.Tensor | None = None       # [n, k] their raw log-probs


def draw_layout(capture: bool, top_k: int | None) -> list[tuple[str, int]]:
    """The flat tensor's rows in order, as (StepDraw field, number of rows): the fields a decode step fills."""
    rows = [("ids", 1), ("logprobs", 1)]
    if capture:
        rows += [("capture_logprobs", 1), ("entropy", 1)]
    if top_k is not None:
        rows += [("raw_logprobs", 1), ("top_ids", top_k), ("top_logprobs", top_k)]
    return rows


def layout_rows(layout: list[tuple[str, int]]) -> int:
    """Rows of the flat tensor of `layout`."""
    return sum(width for _, width in layout)


def flatten(draw: StepDraw, layout: list[tuple[str, int]]) -> torch.Tensor:
    """[rows, n] float64: the layout's fields of `draw`, one row per value (an [n, k] field gives k rows)."""
    parts = []
    for name, _ in layout:
        value = getattr(draw, name)
        parts.append(value.T.double() if name in _PER_CHOICE else value.double()[None])
    return torch.cat(parts)


def rebuild(flat: torch.Tensor, layout: list[tuple[str, int]]) -> StepDraw:
    """The StepDraw whose `flatten` is `flat` [rows, n]: each field back in its dtype and shape."""
    fields, row = {}, 0
    for name, width in layout:
        block = flat[row:row + width].T if name in _PER_CHOICE else flat[row]
        fields[name] = block.long() if name in _IDS else block.float()
        row += width
    return StepDraw(**fields)


def share_draw(draw: StepDraw | None, layout: list[tuple[str, int]], drawn: torch.Tensor) -> StepDraw:
    """The sampler's draw for the rows `drawn` (bool over the rows fed this step; `draw` is None off the sampler
    stage), on every stage, over all fed rows: zeros for those not drawn."""
    rows = layout_rows(layout)
    if draw is None:
        flat = torch.zeros(rows, int(drawn.sum()), dtype=torch.float64, device=drawn.device)
    else:
        flat = flatten(draw, layout)
    every = torch.zeros(rows, drawn.numel(), dtype=torch.float64, device=drawn.device)
    every[:, drawn] = share_from_sampler(flat)
    return rebuild(every, layout)
