"""Sampling rules: top-p against transformers, the sampled distribution and log-probs, the captured statistics."""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.inference.sampling import SamplingParams, sample_tokens, token_stats, top_p_filter


def test_top_p_filter_keeps_smallest_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    def kept(top_p):
        return torch.isfinite(top_p_filter(logits, top_p))[0].tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.95) == [True, True, True, True] or kept(0.95) == [True, True, True, False]
    assert kept(0.94) == [True, True, True, False]
    assert kept(1e-9) == [True, False, False, False]


def test_sample_tokens_distribution_and_logprob():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    ids, logp = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.85), gen)
    counts = torch.bincount(ids, minlength=3).float() / len(ids)
    assert counts[2] == 0 and abs(counts[0] - 0.7 / 0.9) < 0.03
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1))


def test_sampling_params_errors():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


@pytest.mark.parametrize("greedy", [True, False])
def test_sample_tokens_leaves_the_logits_alone(greedy):
    """The capture reads the same logits after sampling: suppression must not edit them in place."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    params = SamplingParams(greedy=greedy, temperature=0.7, suppress_token_ids=(1, 2))
    ids, _ = sample_tokens(logits, params, torch.Generator().manual_seed(1))
    assert torch.equal(logits, before)
    logp, entropy = token_stats(logits, ids, 0.7)
    ref = torch.log_softmax(before.double() / 0.7, -1)
    torch.testing.assert_close(logp.double(), ref.gather(-1, ids[:, None]).squeeze(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy.double(), -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale,top_p", [(0.5, 0.9), (3.0, 0.9), (10.0, 0.7), (3.0, 0.3)])
def test_top_p_filter_matches_transformers(scale, top_p):
    """The kept set equals transformers' TopPLogitsWarper (float64, the textbook sort) on a 32k vocabulary,
    flat to peaked, with suppressed (-inf) ids; only a token whose preceding mass is within float32 rounding
    (1e-5) of top_p may fall either way."""
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(16, 32000, generator=gen) * scale
    logits[:, [3, 17, 31999]] = float("-inf")
    ours = torch.isfinite(top_p_filter(logits, top_p))
    ref = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.double()))
    probs = logits.double().softmax(-1)
    order = probs.argsort(-1, descending=True)
    sorted_p = probs.gather(-1, order)
    before = (sorted_p.cumsum(-1) - sorted_p).scatter(-1, order, sorted_p.cumsum(-1) - sorted_p)
    ambiguous = (before - top_p).abs() < 1e-5
    assert ref.sum() > 16 and not ref[:, [3, 17, 31999]].any()
    assert torch.equal(ours & ~ambiguous, ref & ~ambiguous)
    assert int(ambiguous.sum()) <= 16


def test_argsort_descending_orders_like_torch():
    from megatron_sayo.distributed.runtime import argsort_descending

    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    x[:, 7] = float("-inf")
    order = argsort_descending(x)
    assert order.dtype == torch.long
    assert torch.equal(x.gather(-1, order), x.sort(-1, descending=True).values)
    assert torch.equal(argsort_descending(x.double()), order)
