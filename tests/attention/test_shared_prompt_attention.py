"""The mask-free attention of packed rows (models/qwen25vl/shared_prompt_attention.py, issue 30): prompt part + own
completion part merged by log-sum-exp equals the masked form (SDPA with shared_allowed's dense
mask) within 1e-6 relative in float32, outputs and q/k/v gradients, for the math and torch's fused kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_sayo.models.qwen25vl.shared_prompt_attention import (
    AtenFlashKernel,
    MathKernel,
    row_parts,
    shared_allowed,
    split_attention,
)

TOL = 1e-6


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


def _segments():
    """Row 0: 2 pad, 5 prompt, completions of 3, 1, 4 tokens, 2 pad; row 1: 7 prompt, completions 2 and 6, 2 pad."""
    row0 = [-1] * 2 + [0] * 5 + [1] * 3 + [2] + [3] * 4 + [-1] * 2
    row1 = [0] * 7 + [1] * 2 + [2] * 6 + [-1] * 2
    return torch.tensor([row0, row1])


def test_row_parts_hand_case():
    assert row_parts(_segments()) == [(2, 7, [(7, 3), (10, 1), (11, 4)], [0, 1, 15, 16]),
                                      (0, 7, [(7, 2), (9, 6)], [15, 16])]


@pytest.mark.parametrize("kernel", [MathKernel, AtenFlashKernel])
def test_split_equals_masked(kernel):
    seg = _segments()
    g = torch.Generator().manual_seed(0)
    b, h, groups, S, d = 2, 4, 2, seg.shape[1], 8
    q = torch.randn(b, h, S, d, generator=g, requires_grad=True)
    k = torch.randn(b, groups, S, d, generator=g, requires_grad=True)
    v = torch.randn(b, groups, S, d, generator=g, requires_grad=True)
    dout = torch.randn(b, h, S, d, generator=g)
    scale = d ** -0.5
    allowed = shared_allowed(seg)[:, None]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=allowed, scale=scale)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    got, lse = split_attention(q, k, v, seg, scale, kernel)
    assert _rel(got, want) <= TOL
    assert _rel(lse, torch.logsumexp(scores, -1)) <= TOL
    for name, g_got, g_want in zip("qkv", torch.autograd.grad(got, (q, k, v), dout), want_grads):
        assert _rel(g_got, g_want) <= TOL, name


def test_a_leaking_mask_is_detected():
    """The same comparison against a mask letting completion 2 see completion 1 fails (the test can fail)."""
    seg = _segments()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, seg.shape[1], 8, generator=g) for _ in range(3))
    leaky = shared_allowed(seg) | (torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril() & (seg[:, None] > 0))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=leaky[:, None], scale=0.3)
    assert _rel(split_attention(q, k, v, seg, 0.3)[0], want) > 1e-2
