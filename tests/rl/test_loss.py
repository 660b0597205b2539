"""GRPO and NLL losses (sums over valid tokens, megatron's per-token contract) vs naive per-token loops (values,
metrics, gradients); DP=2 with uneven token counts sums to the single-process loss and gradient."""

import math

import pytest
import torch

from megatron_sayo.distributed import runtime
from megatron_sayo.rl.loss import grpo_loss, nll_loss

CLIP, BETA = 0.2, 0.05


def naive_loss(logp, old, ref, adv, mask, clip, beta):
    """Scalar loop: sum over valid tokens of -min(r A, clip(r) A) + beta * k3."""
    total = 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b][t]:
                continue
            r = torch.exp(logp[b, t] - old[b][t])
            rc = min(max(r.item(), 1 - clip), 1 + clip)
            rc = r if rc == r.item() else torch.tensor(rc, dtype=torch.float64)  # clamp: no grad when clipped
            term = -torch.minimum(r * adv[b], rc * adv[b])
            if ref is not None:
                d = ref[b][t] - logp[b, t]
                term = term + beta * (torch.exp(d) - d - 1)
            total = total + term
    return total


def naive_metrics(logp, old, ref, adv, mask, clip):
    kls, clipped, ratios = [], 0, []
    for b in range(len(logp)):
        for t in range(len(logp[0])):
            if mask[b][t]:
                r = math.exp(logp[b][t] - old[b][t])
                ratios.append(r)
                d = ref[b][t] - logp[b][t]
                kls.append(math.exp(d) - d - 1)
                clipped += (r < 1 - clip and adv[b] < 0) or (r > 1 + clip and adv[b] > 0)
    return {"kl": sum(kls), "clip_fraction": clipped, "ratio_mean": sum(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "tokens": len(ratios)}


def batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4   # ratios on both sides of the clip
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6])[:B]
    mask = torch.arange(T) < lengths.view(-1, 1)
    logp[~mask] = float("-inf")  # padding garbage must not leak into loss or grads
    old[~mask] = float("nan")
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("with_ref", [True, False])
def test_loss_metrics_and_grads_match_naive_loop(with_ref):
    logp, old, ref, adv, mask = batch()
    ref = ref if with_ref else None
    x = logp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, old, ref, adv, mask, CLIP, BETA)
    loss.backward()
    y = logp.clone().requires_grad_(True)
    want = naive_loss(y, old.tolist(), None if ref is None else ref.tolist(), adv.tolist(), mask.tolist(),
                      CLIP, BETA)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    torch.testing.assert_close(x.grad, y.grad.nan_to_num(0.0), atol=1e-12, rtol=0)
    assert torch.all(x.grad[~mask] == 0) and torch.isfinite(x.grad).all()
    if with_ref:
        m = naive_metrics(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), CLIP)
        for key, value in m.items():
            assert metrics[key].item() == pytest.approx(value, abs=1e-12), key
        assert 0 < metrics["clip_fraction"] and metrics["ratio_min"] < 1 - CLIP and metrics["ratio_max"] > 1 + CLIP
    else:
        assert metrics["kl"].item() == 0


def test_hand_values():
    # one token, ratio e^0.5 > 1.2, A = 1 -> clipped: pg = -1.2; ref = logp -> k3 = 0
    mask = torch.tensor([[True]])
    lp = torch.tensor([[-1.0]], dtype=torch.float64)
    loss, m = grpo_loss(lp, lp - 0.5, lp, torch.tensor([1.0]), mask, 0.2, 0.1)
    assert loss.item() == pytest.approx(-1.2) and m["clip_fraction"].item() == 1.0
    # ratio 1, A = -2 -> pg = 2; ref - logp = 1 -> k3 = e - 2
    loss, m = grpo_loss(lp, lp, lp + 1, torch.tensor([-2.0]), mask, 0.2, 0.1)
    assert loss.item() == pytest.approx(2 + 0.1 * (math.e - 2))
    assert m["kl"].item() == pytest.approx(math.e - 2)


def test_nll_loss_matches_naive_sum():
    logp, _, _, _, mask = batch()
    x = logp.clone().requires_grad_(True)
    loss, m = nll_loss(x, mask)
    loss.backward()
    want = -sum(logp[b, t].item() for b in range(logp.shape[0]) for t in range(logp.shape[1]) if mask[b, t])
    assert loss.item() == pytest.approx(want, abs=1e-12) and m["tokens"].item() == int(mask.sum())
    assert torch.equal(x.grad, torch.where(mask, -1.0, 0.0).double())


W_SHAPE = (4, 6)  # features -> vocab


def model_batch():
    """A shared weight W; per-token log-probs log_softmax(x W)[target]; 5 sequences of uneven lengths."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*W_SHAPE, generator=g, dtype=torch.float64)
    x = torch.randn(5, 7, W_SHAPE[0], generator=g, dtype=torch.float64)
    targets = torch.randint(0, W_SHAPE[1], (5, 7), generator=g)
    _, old, ref, adv, mask = batch()
    return w, x, targets, old, ref, adv, mask


def loss_and_grad(rows):
    """This rank's loss sum and its gradient, and its token count."""
    w, x, targets, old, ref, adv, mask = model_batch()
    w = w.requires_grad_(True)
    logp = torch.log_softmax(x[rows] @ w, -1).gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
    loss, m = grpo_loss(logp, old[rows], ref[rows], adv[rows], mask[rows], CLIP, BETA)
    loss.backward()
    return loss.detach(), w.grad, m["tokens"]


def _dp2_worker():
    runtime.init_distributed(tp=1, pp=1)
    from megatron.core import parallel_state

    rank = parallel_state.get_data_parallel_rank()
    rows = slice(0, 1) if rank == 0 else slice(1, 5)  # 7 tokens vs 15 tokens
    return loss_and_grad(rows)


@pytest.mark.multiproc
def test_two_dp_ranks_sum_to_the_single_process_gradient():
    """Summed over ranks and divided by the summed token count (what megatron's DDP + finalize_model_grads do
    with a per-token loss), the ranks' gradients are the single-process token-mean gradient."""
    loss, grad, count = loss_and_grad(slice(0, 5))
    assert count.item() == 22
    results = runtime.spawn_local(_dp2_worker, 2)
    assert [r[2].item() for r in results] == [7, 15]
    total = results[0][2] + results[1][2]
    assert ((results[0][0] + results[1][0]) / total).item() == pytest.approx(loss.item() / 22, abs=1e-12)
    torch.testing.assert_close((results[0][1] + results[1][1]) / total, grad / 22, atol=1e-12, rtol=0)
