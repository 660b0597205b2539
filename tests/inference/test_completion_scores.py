"""CompletionScores: padding zeroed, shapes checked, row concatenation, the capture-vs-scoring difference."""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.inference.completion_scores import CompletionScores


def test_scores_zero_padding_and_check_shapes():
    mask = torch.tensor([[1, 1, 0]])
    s = CompletionScores(torch.tensor([[-1.0, -2.0, float("nan")]]), torch.ones(1, 3), None, None, mask)
    assert s.logprobs.tolist() == [[-1.0, -2.0, 0.0]] and s.entropy.tolist() == [[1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="entropy"):
        CompletionScores(torch.zeros(1, 3), torch.zeros(1, 2), None, None, mask)
    both = CompletionScores.cat([s, s])
    assert both.logprobs.shape == (2, 3) and both.region_mass is None
    other = CompletionScores(torch.tensor([[-1.5, -2.0, 7.0]]), torch.ones(1, 3), None, None, mask)
    assert s.mean_abs_difference(other) == {"logprobs": 0.25, "entropy": 0.0}
