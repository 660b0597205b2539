"""StepDraw's flat layout: flatten then rebuild gives every field back bit for bit, rows not drawn read zero."""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.inference import step_draw
from megatron_sayo.inference.sampling import SamplingParams, draw_step
from megatron_sayo.inference.step_draw import draw_layout, flatten, layout_rows, rebuild, share_draw


def _draw(n: int, capture: bool, top_k: int | None) -> step_draw.StepDraw:
    """A StepDraw from random logits over a vocabulary larger than float32's exact integers."""
    logits = torch.randn(n, 300, generator=torch.Generator().manual_seed(n)) * 4
    draw = draw_step(logits, SamplingParams(temperature=0.7, top_p=0.9), torch.Generator().manual_seed(1),
                     capture=capture, top_k=top_k)
    draw.ids = draw.ids + 2**24 + 1       # ids float32 could not hold: the float64 layout must
    return draw


@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("top_k", [None, 0, 3])
def test_flatten_then_rebuild_is_exact(capture, top_k):
    layout = draw_layout(capture, top_k)
    draw = _draw(5, capture, top_k)
    flat = flatten(draw, layout)
    assert flat.dtype == torch.float64 and flat.shape == (layout_rows(layout), 5)
    back = rebuild(flat, layout)
    for name in ("ids", "logprobs", "capture_logprobs", "entropy", "raw_logprobs", "top_ids", "top_logprobs"):
        want, got = getattr(draw, name), getattr(back, name)
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_layout_rows_in_order():
    assert draw_layout(False, None) == [("ids", 1), ("logprobs", 1)]
    assert draw_layout(True, 2) == [("ids", 1), ("logprobs", 1), ("capture_logprobs", 1), ("entropy", 1),
                                    ("raw_logprobs", 1), ("top_ids", 2), ("top_logprobs", 2)]
    assert layout_rows(draw_layout(True, 2)) == 9


def test_share_draw_puts_zeros_in_rows_not_drawn(monkeypatch):
    monkeypatch.setattr(step_draw, "share_from_sampler", lambda values: values)   # one stage: nothing to send
    layout = draw_layout(True, 2)
    draw = _draw(3, True, 2)
    drawn = torch.tensor([True, False, True, False, True])
    every = share_draw(draw, layout, drawn)
    assert torch.equal(every.ids[drawn], draw.ids) and (every.ids[~drawn] == 0).all()
    assert torch.equal(every.top_ids[drawn], draw.top_ids) and every.top_ids.shape == (5, 2)
    assert torch.equal(every.entropy[drawn], draw.entropy) and (every.entropy[~drawn] == 0).all()
    off_sampler = share_draw(None, layout, drawn)     # off the sampler stage: a buffer of the same shape
    assert off_sampler.ids.shape == (5,) and (off_sampler.top_logprobs == 0).all()
