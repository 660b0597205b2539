"""DAPO's GRPO options against direct computations of its formulas (DAPO, arXiv 2503.14476, eq. 8-11):
clip-higher, J = sum_t min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (loss.clip_eps_high), and dynamic sampling
(rollout.dynamic_sampling): keep only groups with 0 < #correct < G, i.e. reward std > 0, drawing more batches
until the batch is full; at DP=2 the ranks draw the same number of batches however their groups fall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sayo.config import LossConfig, load_config
from megatron_sayo.rl.dynamic_sampling import choose_groups, draw_until_full, group_has_signal
from megatron_sayo.rl.loss import grpo_loss, grpo_token_loss


def dapo_objective(logp, old, adv, mask, eps_low, eps_high):
    """-sum over valid tokens of min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), one token at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                r = torch.exp(logp[b, t] - old[b, t])
                lo, hi = 1 - eps_low, 1 + eps_high
                rc = r if lo <= r.item() <= hi else torch.tensor(min(max(r.item(), lo), hi), dtype=torch.float64)
                total = total - torch.minimum(r * adv[b], rc * adv[b])
    return total


def batch(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3   # ratios ~0.5..2: every branch
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.arange(T) < torch.tensor([5, 2, 4, 1, 3, 5])[:B, None]
    old[0, :2] = logp[0, :2] - torch.log(torch.tensor([1.25, 1.1], dtype=torch.float64))  # between the bounds
    adv[0] = adv[0].abs() + 0.1
    return logp, old, adv, mask


@pytest.mark.parametrize("eps_high", [0.28, None])
def test_clip_higher_equals_dapo_objective_and_its_gradient(eps_high):
    logp, old, adv, mask = batch()
    high = 0.2 if eps_high is None else eps_high
    ratio = torch.exp(logp - old)[mask]
    a = adv[:, None].expand_as(logp)[mask]
    assert ((ratio > 1.2) & (ratio < 1.28) & (a > 0)).any(), "a ratio between the two upper bounds, A > 0"
    x = logp.clone().requires_grad_(True)
    loss, m = grpo_loss(x, old, None, adv, mask, clip_eps=0.2, kl_beta=0.0, clip_eps_high=eps_high)
    (grad,) = torch.autograd.grad(loss, x)
    y = logp.clone().requires_grad_(True)
    want = dapo_objective(y, old, adv, mask, 0.2, high)
    (want_grad,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    taken = ((ratio < 0.8) & (a < 0)) | ((ratio > 1 + high) & (a > 0))
    assert m["clip_fraction"].item() == taken.sum().item()


def test_config_reaches_the_loss_and_defaults_to_clip_eps():
    logp, old, adv, mask = batch(1)
    assert LossConfig().clip_eps_high is None
    cfg = load_config(None, ["loss.clip_eps_high=0.5", "loss.clip_eps=0.1"], complete=False).loss
    loss, _ = grpo_token_loss(old, None, adv, cfg)(logp, slice(None), mask)
    torch.testing.assert_close(loss, dapo_objective(logp, old, adv, mask, 0.1, 0.5))
    with pytest.raises(ValueError, match="loss.clip_eps_high"):
        load_config(None, ["loss.clip_eps_high=-1"], complete=False)


# ------------------------------------------------------------------------------------------------ dynamic sampling

G = 4


def rewards_of(pattern: str, seed: int) -> np.ndarray:
    """Rewards [len(pattern) * G]: 'f' a group of one repeated value, 's' a group with a spread (0/1 accuracies
    with at least one of each, or continuous values)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, kind in enumerate(pattern):
        if kind == "f":
            out += [float(rng.integers(0, 2))] * G
        elif i % 2:
            out += list(rng.permutation([1.0, 0.0] + list(rng.integers(0, 2, G - 2).astype(float))))
        else:
            out += list(rng.random(G))
    return np.array(out)


def dapo_reference(batches: list[np.ndarray], need: int, max_batches: int):
    """DAPO's loop (its Algorithm 1, lines 4-7): draw batches, keep groups with reward std > 0 until `need` are
    kept (then cut to `need`); at the cap, top up with the first flat groups. ((batch, group) kept, batches
    drawn, flat groups dropped)."""
    kept, flat, drawn = [], [], 0
    for b, r in enumerate(batches[:max_batches]):
        drawn += 1
        for g, group in enumerate(r.reshape(-1, G)):
            (kept if np.std(group) > 0 else flat).append((b, g))
        if len(kept) >= need:
            break
    kept = kept[:need]
    top_up = flat[:need - len(kept)]
    return sorted(kept + top_up), drawn, len(flat) - len(top_up)


@pytest.mark.parametrize("patterns, cap", [
    (["sfsf", "ffss", "ssss"], 4),   # full in the second batch; its last group is surplus
    (["ffff", "fsff", "ffff"], 3),   # never full: the cap, topped up with the first flat groups
    (["ssss"], 2),                   # the first batch is full: nothing extra
    (["sffs", "fffs", "sfff"], 2),   # the cap cuts the draw at two batches
])
def test_dynamic_sampling_keeps_what_dapo_keeps(patterns, cap):
    batches = [rewards_of(p, seed) for seed, p in enumerate(patterns)]
    for r, p in zip(batches, patterns):   # the filter is DAPO's std > 0
        assert group_has_signal(torch.tensor(r), G).tolist() == [bool(np.std(g) > 0) for g in r.reshape(-1, G)]
        assert group_has_signal(torch.tensor(r), G).tolist() == [c == "s" for c in p]
    calls = []

    def draw(index, generate):
        calls.append((index, generate))
        return group_has_signal(torch.tensor(batches[index]), G).tolist() if generate else None

    need = 4
    chosen, stats = draw_until_full(draw, need, G, cap)
    want, drawn, dropped = dapo_reference(batches, need, cap)
    assert chosen == want
    assert stats.batches == drawn == len(calls) and all(gen for _, gen in calls)
    assert stats.groups_dropped == dropped
    assert stats.groups_filled == need - sum(np.std(batches[b][g * G:(g + 1) * G]) > 0 for b, g in want)
    assert stats.extra_rollouts == (drawn - 1) * need * G


def test_choose_groups_in_draw_order():
    assert choose_groups([[False, True], [True, True]], 2) == ([(0, 1), (1, 0)], 0)
    assert choose_groups([[False, False], [True, False]], 3) == ([(0, 0), (0, 1), (1, 0)], 2)


def _rank_draws(signal_by_rank: list[list[list[bool]]], need: int, cap: int):
    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    import torch.distributed as dist

    rank = dist.get_rank()
    calls = []

    def draw(index, generate):
        calls.append((index, generate))
        return signal_by_rank[rank][index] if generate else None

    chosen, stats = draw_until_full(draw, need, G, cap, dist.group.WORLD)
    return calls, chosen, stats


@pytest.mark.multiproc
def test_dp_ranks_draw_in_lockstep():
    """Rank 0 is full after one batch, rank 1 after three: both draw three batches (rank 0 without generating),
    so the collectives inside each draw line up, and the logged counts are the sums over both ranks."""
    from megatron_sayo.distributed.runtime import spawn_local

    T, F = True, False
    signal = [[[T, T], [T, T], [T, T], [T, T]], [[F, F], [T, F], [F, T], [T, T]]]
    results = spawn_local(_rank_draws, 2, signal, 2, 4, timeout_s=120)
    (calls0, chosen0, stats0), (calls1, chosen1, stats1) = results
    assert calls0 == [(0, True), (1, False), (2, False)]
    assert calls1 == [(0, True), (1, True), (2, True)]
    assert chosen0 == [(0, 0), (0, 1)] and chosen1 == [(1, 0), (2, 1)]
    assert stats0 == stats1
    assert (stats0.batches, stats0.groups_dropped, stats0.groups_filled) == (3, 4, 0)
    assert stats0.extra_rollouts == (0 + 4) * G   # rank 1 generated two batches of two groups beyond its share


# ------------------------------------------------------------------------------------------------ the trainer

def _train(tiny_ckpt, tmp_path, extra):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from megatron_sayo.train import write_synthetic

    root = Path(__file__).resolve().parents[2]
    write_synthetic(tmp_path / "train.jsonl", 8, seed=0)
    args = [f"model.hf_path={tiny_ckpt}", "model.make_tiny_if_missing=false",
            f"data.train_file={tmp_path / 'train.jsonl'}", "data.eval_file=null", "data.synthetic_n=0",
            f"run_dir={tmp_path / 'run'}", "train.steps=2",
            "train.global_batch=2", "train.micro_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=4",
            "checkpoint.interval=0", "log.tensorboard=false", "warmup.steps=0", "eval.interval=0",
            "rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_batches=2", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_sayo.train", "--config", str(root / "megatron_sayo/configs/tiny.yaml"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("layout, weights, want", [
    # DP=2, every group flat (a random model earns no format or accuracy reward): both ranks draw to the cap,
    # then train on the first flat groups; dropped 2 x 2 - 2, extra rollouts 1 batch x 1 group x G=2 x 2 ranks
    # (and the attention reward, weighted 0, pooled over the reasoning tokens: reward.token_selection in a run)
    ("parallel.tp=1", "reward.weights.attention=0 reward.token_selection=reasoning",
     dict(dynamic_batches=2, dynamic_groups_dropped=2, dynamic_groups_filled=2, dynamic_extra_rollouts=4)),
    # PP=2, the attention reward gives every group a spread: the first stage learns that from the last one
    ("parallel.pp=2", "reward.weights.attention=1", dict(dynamic_batches=1, dynamic_groups_dropped=0,
                                                          dynamic_groups_filled=0, dynamic_extra_rollouts=0)),
])
def test_trainer_dynamic_sampling_at_dp2_and_pp2(tiny_ckpt, tmp_path, layout, weights, want):
    rows = _train(tiny_ckpt, tmp_path, ["parallel.tp=1", layout, *weights.split()])
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {k: row[k] for k in want} == want
        assert row["sequences"] == 4 and row["groups"] == 2
        assert row["groups_no_signal"] == want["dynamic_groups_filled"]
