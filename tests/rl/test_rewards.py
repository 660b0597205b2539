"""Rewards vs hand-computed values and naive per-token loops written independently here."""

import math
from fractions import Fraction

import pytest
import torch

from megatron_sayo.config import RewardConfig, RewardWeights
from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.rl.rewards import (
    accuracy_reward,
    attention_reward,
    extract_answer,
    format_reward,
    select_top_entropy,
    sequence_attention_reward,
    text_rewards,
    top_k_count,
    total_reward,
)

# ---------------------------------------------------------------- top-k entropy selection

def naive_select(entropy, mask, ratio):
    out = [[False] * len(row) for row in entropy]
    for b, (row, mrow) in enumerate(zip(entropy, mask)):
        real = [j for j, m in enumerate(mrow) if m]
        if not real:
            continue
        k = max(1, math.floor(Fraction(str(ratio)) * len(real)))
        for j in sorted(real, key=lambda j: (-row[j], j))[:k]:
            out[b][j] = True
    return out


def test_select_hand_case():
    entropy = torch.tensor([[0.5, 0.9, 0.9, 0.1, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    assert select_top_entropy(entropy, mask, 0.5).tolist() == [[False, True, True, False, False]]
    assert select_top_entropy(entropy, mask, 0.3).tolist() == [[False, True, False, False, False]]  # tie: earlier
    assert top_k_count(10, 0.3) == 3 and top_k_count(3, 0.3) == 1 and top_k_count(100, 0.29) == 29
    assert top_k_count(0, 0.3) == 0


def test_select_matches_naive_loop_with_ties_and_padding():
    g = torch.Generator().manual_seed(1)
    for ratio in (0.3, 0.5, 0.05, 1.0):
        entropy = torch.randint(0, 4, (6, 11), generator=g).double()  # many ties
        mask = torch.rand(6, 11, generator=g) < 0.7
        mask[0] = False                      # an empty completion
        mask[1] = torch.arange(11) < 7       # a right-padded one
        got = select_top_entropy(entropy, mask, ratio)
        assert got.tolist() == naive_select(entropy.tolist(), mask.tolist(), ratio)


# ---------------------------------------------------------------- attention reward

def naive_attention(a, v, sel, form, eps=1e-8):
    rewards, tass = [], []
    for arow, vrow, srow in zip(a, v, sel):
        picked = [j for j, s in enumerate(srow) if s]
        big_a = sum(arow[j] for j in picked) / len(picked) if picked else 0.0
        big_v = sum(vrow[j] for j in picked) / len(picked) if picked else 0.0
        x = (big_a + eps) / (big_v + eps)
        rewards.append(x * x / (1 + x * x) if form == "paper" else math.tanh(math.log(x)))
        tass.append(x)
    return rewards, tass


def test_attention_reward_hand_values():
    a = torch.tensor([[0.2, 0.1, 9.0], [0.3, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.1, 0.1, 9.0], [0.1, 0.2, 0.0]], dtype=torch.float64)
    sel = torch.tensor([[True, True, False], [True, True, False]])
    paper, tas = attention_reward(a, v, sel, "paper")
    code, _ = attention_reward(a, v, sel, "code")
    # row 0: A = 0.15, V = 0.1, x = 1.5; row 1: pooled first -> x = 1 (mean of ratios would be 1.5)
    torch.testing.assert_close(tas, torch.tensor([1.5, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(paper, torch.tensor([2.25 / 3.25, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(code, torch.tensor([1.25 / 3.25, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        attention_reward(a, v, sel, "other")


def test_attention_reward_matches_naive_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(5, 9, generator=g, dtype=torch.float64) * 0.01
    v = torch.rand(5, 9, generator=g, dtype=torch.float64) * 0.01
    sel = torch.rand(5, 9, generator=g) < 0.4
    sel[0] = False
    a[1] = 0.0  # region ignored entirely: x -> eps / (V + eps)
    for form in ("paper", "code"):
        reward, tas = attention_reward(a, v, sel, form)
        want_r, want_x = naive_attention(a.tolist(), v.tolist(), sel.tolist(), form)
        torch.testing.assert_close(reward, torch.tensor(want_r, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(tas, torch.tensor(want_x, dtype=torch.float64), atol=0, rtol=1e-12)


def test_sequence_attention_reward_end_to_end_vs_naive():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 6
    region = torch.rand(B, T, generator=g, dtype=torch.float64)
    image = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64)
    lengths = [6, 3, 5]
    mask = torch.arange(T) < torch.tensor(lengths).view(-1, 1)
    scores = CompletionScores(logprobs=torch.zeros(B, T), entropy=entropy, region_mass=region, image_mass=image,
                              mask=mask)
    reward, tas, selected = sequence_attention_reward(scores, 0.5, "code")
    want = []
    for b in range(B):
        toks = [(entropy[b, j].item(), j, region[b, j].item(), image[b, j].item()) for j in range(lengths[b])]
        k = max(1, math.floor(0.5 * lengths[b]))
        top = sorted(toks, key=lambda t: (-t[0], t[1]))[:k]
        assert sorted(t[1] for t in top) == selected[b].nonzero().flatten().tolist()
        x = (sum(t[2] for t in top) / k + 1e-8) / (sum(t[3] for t in top) / k + 1e-8)
        want.append(math.tanh(math.log(x)))
    torch.testing.assert_close(reward, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)


def test_sequence_attention_reward_needs_masses():
    scores = CompletionScores(torch.zeros(1, 2), torch.zeros(1, 2), None, None, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="region and image masses"):
        sequence_attention_reward(scores)


# ---------------------------------------------------------------- format, extraction, accuracy, total

def naive_format(text, n, long_bound=100, short_bound=60, factor=0.6):
    o = text.find("<answer>")
    if o < 0 or text.find("</answer>", o) < 0:
        return 0.0
    long = 1.0 if n <= long_bound else max(0.0, factor * long_bound / n)
    short = 1.0 if n >= short_bound else max(0.0, factor * n / short_bound)
    return long * short


@pytest.mark.parametrize("text, n, want", [
    ("<answer>4</answer>", 80, 1.0),
    ("<answer>4</answer>", 100, 1.0),
    ("<answer>4</answer>", 60, 1.0),
    ("<answer>4</answer>", 50, 0.5),            # short: 0.6 * 50 / 60
    ("<answer>4</answer>", 200, 0.3),           # long: 0.6 * 100 / 200
    ("<answer>4</answer>", 101, 60 / 101),
    ("think\n<answer>a\nb</answer> tail", 70, 1.0),
    ("no tags", 80, 0.0),
    ("<answer>open", 80, 0.0),
    ("</answer>x<answer>", 80, 0.0),
])
def test_format_reward(text, n, want):
    assert format_reward(text, n) == pytest.approx(want, abs=1e-12)
    assert naive_format(text, n) == pytest.approx(want, abs=1e-12)


def test_format_reward_bounds_are_parameters():
    assert format_reward("<answer>x</answer>", 30, long_bound=24, short_bound=8) == pytest.approx(0.6 * 24 / 30)
    assert format_reward("<answer>x</answer>", 4, long_bound=24, short_bound=8) == pytest.approx(0.6 * 4 / 8)


@pytest.mark.parametrize("text, want", [
    ("<answer>a</answer> then <answer> b </answer>", "b"),
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("<answer>\\boxed{7}</answer>", "7"),
    ("\\boxed{1} or \\boxed{2}", "2"),
    ("\\boxed{1", None),
    ("nothing", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("pred, ref, mode, want", [
    ("Paris", "paris", "exact", 0.0),
    (" Paris ", "Paris", "exact", 1.0),
    ("The Paris.", "paris", "normalized", 1.0),
    ("3.5", "35", "normalized", 0.0),
    ("1,000", "1000.0", "numeric", 1.0),
    ("45%", "45", "numeric", 1.0),
    ("3.5", "35", "numeric", 0.0),
    ("1/4", "0.25", "numeric", 1.0),
    ("Red", "red", "numeric", 1.0),             # not numbers: normalized match
    (None, "red", "normalized", 0.0),
])
def test_accuracy_reward(pred, ref, mode, want):
    assert accuracy_reward(pred, ref, mode) == want


def test_text_rewards_row_by_row():
    """Each row's format reward under the config's bounds (the naive formula) and accuracy under its match mode."""
    cfg = RewardConfig(format_long_bound=24, format_short_bound=8, accuracy_match="numeric")
    texts = ["<answer>1,000</answer>", "so \\boxed{0.25}", "<answer>red", "<answer>Red</answer>"]
    lengths, refs = [30, 4, 12, 16], ["1000", "1/4", "red", "red"]
    fmt, acc = text_rewards(texts, lengths, refs, cfg)
    assert fmt == pytest.approx([0.6 * 24 / 30, 0.0, 0.0, 1.0], abs=1e-12)
    assert acc == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        text_rewards(texts, lengths[:3], refs, cfg)


def test_total_reward():
    comps = {"attention": torch.tensor([0.2, 0.4], dtype=torch.float64), "format": [1.0, 0.0]}
    got = total_reward(comps, RewardWeights(attention=1.0, format=0.5, accuracy=0.0))
    torch.testing.assert_close(got, torch.tensor([0.7, 0.4], dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(KeyError):
        total_reward(comps, RewardWeights(accuracy=1.0))
    with pytest.raises(KeyError):
        total_reward({**comps, "bonus": torch.ones(2)}, RewardWeights())
