"""Vocab-parallel log-probs and entropies vs a full-vocabulary torch computation (float64, tol 1e-6)."""

import pytest
import torch

from megatron_sayo.distributed import runtime
from megatron_sayo.rl.logprobs import (
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)

TOL = 1e-6
PADDED_VOCAB, VOCAB, T = 12, 9, 0.7   # ids 9..11 are TP padding (all on rank 1 at TP=2)


def case(scale=3.0):
    """Logits [S=5, B=3, V_padded] (megatron layout), targets [5, 3], upstream weights [5, 3]."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, PADDED_VOCAB, generator=g, dtype=torch.float64) * scale
    logits[..., VOCAB:] = 50.0  # padding must not leak in, even with large values
    targets = torch.randint(0, VOCAB, (5, 3), generator=g)
    targets[0, :] = torch.tensor([0, VOCAB - 1, 5])  # ids on both shards, including the last real id
    weights = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return logits, targets, weights


def reference(logits, targets, weights):
    """Plain full-vocab log_softmax on the true vocabulary; grads by autograd."""
    x = logits.clone().requires_grad_(True)
    logp_all = torch.log_softmax(x[..., :VOCAB] / T, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp * weights).sum().backward()
    return logp.detach(), entropy.detach(), x.grad


def test_tp1_matches_full_vocab():
    for scale in (3.0, 300.0):
        logits, targets, weights = case(scale)
        ref_logp, ref_ent, ref_grad = reference(logits, targets, weights)
        x = logits.clone().requires_grad_(True)
        logp = vocab_parallel_logprobs(x, targets, temperature=T, vocab_size=VOCAB, group=None)
        (logp * weights).sum().backward()
        ent = vocab_parallel_entropy(logits, temperature=T, vocab_size=VOCAB, group=None)
        torch.testing.assert_close(logp.detach(), ref_logp, atol=TOL, rtol=0)
        torch.testing.assert_close(ent, ref_ent, atol=TOL, rtol=0)
        torch.testing.assert_close(x.grad, ref_grad, atol=TOL, rtol=0)
        assert torch.all(x.grad[..., VOCAB:] == 0)
        both = vocab_parallel_logprobs_and_entropy(logits, targets, temperature=T, vocab_size=VOCAB, group=None)
        torch.testing.assert_close(both[0], ref_logp, atol=TOL, rtol=0)
        torch.testing.assert_close(both[1], ref_ent, atol=TOL, rtol=0)


def test_batch_first_layout_and_float32():
    logits, targets, weights = case()
    ref_logp, ref_ent, _ = reference(logits, targets, weights)
    bsv = logits.transpose(0, 1).float()  # [B, S, V], float32 input
    logp = vocab_parallel_logprobs(bsv, targets.t(), temperature=T, vocab_size=VOCAB, group=None)
    ent = vocab_parallel_entropy(bsv, temperature=T, vocab_size=VOCAB, group=None)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp.t(), atol=1e-5, rtol=0)  # float32 rounding
    torch.testing.assert_close(ent.double(), ref_ent.t(), atol=1e-5, rtol=0)


def _tp2_worker():
    runtime.init_distributed(tp=2, pp=1)
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    logits, targets, weights = case()
    shard = PADDED_VOCAB // 2
    x = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
    logp = vocab_parallel_logprobs(x, targets, temperature=T, vocab_size=VOCAB)  # default: megatron TP group
    (logp * weights).sum().backward()
    ent = vocab_parallel_entropy(x.detach(), temperature=T, vocab_size=VOCAB)
    both = vocab_parallel_logprobs_and_entropy(x.detach(), targets, temperature=T, vocab_size=VOCAB)
    return logp.detach(), ent, x.grad, both


@pytest.mark.multiproc
def test_tp2_matches_full_vocab():
    logits, targets, weights = case()
    ref_logp, ref_ent, ref_grad = reference(logits, targets, weights)
    results = runtime.spawn_local(_tp2_worker, 2)
    for logp, ent, _, (logp2, ent2) in results:
        for got, want in ((logp, ref_logp), (ent, ref_ent), (logp2, ref_logp), (ent2, ref_ent)):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    grad = torch.cat([results[0][2], results[1][2]], dim=-1)
    torch.testing.assert_close(grad, ref_grad, atol=TOL, rtol=0)
