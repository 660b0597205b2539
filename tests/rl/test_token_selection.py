"""reward.token_selection (entropy | all | reasoning | answer) against naive references: the reasoning / answer
tokens of completions assembled piece by piece from the tiny tokenizer (so which token is which is known by
construction, not found by the code under test), the selections as per-token loops, the pooled reward as a
direct mean over the chosen tokens. TP/PP exactness: tests/inference/test_capture.py (every selection, TP=2, PP=2)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from megatron_sayo.config import ConfigError, RewardConfig, load_config
from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.rl.rewards import TOKEN_SELECTIONS, completion_parts, select_tokens, sequence_attention_reward

# pieces: (text, label); r = reasoning, a = answer content, - = neither (tags, end token)
CASES = [
    [("The red tile is at the top left.", "r"), (" ", "r"), ("<answer>", "-"), ("green", "a"), ("</answer>", "-"),
     (None, "-")],
    [("<answer>", "-"), ("2 blue", "a"), ("</answer>", "-")],
    # two blocks: the last one counts (as extract_answer), the first is reasoning
    [("Maybe", "r"), ("<answer>", "r"), ("x", "r"), ("</answer>", "r"), (" no,", "r"), ("<answer>", "-"),
     ("y", "a"), ("</answer>", "-"), (None, "-")],
    [("no tags at all", "r"), (None, "r")],          # no block: every token is reasoning
    [("cut short", "r"), ("<answer>", "r"), ("re", "r")],   # unclosed: no block
]


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    from megatron_sayo.data.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_ckpt)


def assemble(tok, pieces, eos):
    ids, labels = [], []
    for text, label in pieces:
        piece = [eos] if text is None else tok.encode(text)
        ids += piece
        labels += [label] * len(piece)
    return ids, labels


def test_reasoning_and_answer_tokens_of_assembled_completions(tokenizer):
    eos = tokenizer.eos_id
    rows = [assemble(tokenizer, pieces, eos) for pieces in CASES]
    width = max(len(ids) for ids, _ in rows) + 2
    completion = torch.full((len(rows), width), eos)
    for b, (ids, _) in enumerate(rows):
        completion[b, :len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    reasoning, answer = completion_parts(completion, lengths,
                                         lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    for b, (ids, labels) in enumerate(rows):
        pad = [False] * (width - len(ids))
        assert reasoning[b].tolist() == [lab == "r" for lab in labels] + pad, CASES[b]
        assert answer[b].tolist() == [lab == "a" for lab in labels] + pad, CASES[b]


def naive_select(selection, entropy, mask, ratio, parts):
    """Per-row loops: the k = max(1, floor(ratio n)) highest entropies (earlier first on ties), all, or a part."""
    out = [[False] * len(mask[0]) for _ in mask]
    for b, row in enumerate(mask):
        real = [j for j, m in enumerate(row) if m]
        if selection == "entropy":
            k = max(1, math.floor(Fraction(str(ratio)) * len(real))) if real else 0
            chosen = sorted(real, key=lambda j: (-entropy[b][j], j))[:k]
        elif selection == "all":
            chosen = real
        else:
            part = parts[0] if selection == "reasoning" else parts[1]
            chosen = [j for j in real if part[b][j]]
        for j in chosen:
            out[b][j] = True
    return out


def random_scores(seed=0, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor([9, 4, 0, 7, 1])[:, None]
    entropy = torch.randint(0, 4, (B, T), generator=g).float()
    a, v = torch.rand(B, T, generator=g) * 0.1, torch.rand(B, T, generator=g) * 0.05
    parts = (torch.rand(B, T, generator=g) < 0.5, torch.rand(B, T, generator=g) < 0.4)
    parts[0][:, 6:] = True                         # padding flagged too: never selected
    return CompletionScores(logprobs=torch.zeros(B, T), entropy=entropy, region_mass=a, image_mass=v,
                            mask=mask), parts


@pytest.mark.parametrize("selection", TOKEN_SELECTIONS)
def test_selection_and_pooled_reward_vs_naive(selection):
    scores, parts = random_scores()
    want = naive_select(selection, scores.entropy.tolist(), scores.mask.tolist(), 0.3,
                        (parts[0].tolist(), parts[1].tolist()))
    assert select_tokens(selection, scores.entropy, scores.mask, 0.3, parts).tolist() == want
    reward, tas, selected = sequence_attention_reward(scores, 0.3, "code", 1e-8, selection, parts)
    assert selected.tolist() == want
    for b, row in enumerate(want):
        chosen = [j for j, s in enumerate(row) if s]
        a = sum(float(scores.region_mass[b, j]) for j in chosen) / max(len(chosen), 1)
        v = sum(float(scores.image_mass[b, j]) for j in chosen) / max(len(chosen), 1)
        x = (a + 1e-8) / (v + 1e-8)
        assert tas[b].item() == pytest.approx(x, rel=1e-5)
        assert reward[b].item() == pytest.approx(math.tanh(math.log(x)), abs=1e-5)


def test_default_is_entropy_and_a_bad_value_names_the_choices():
    assert RewardConfig().token_selection == "entropy"
    with pytest.raises(ConfigError, match=r"reward\.token_selection.*'entropy', 'all', 'reasoning', 'answer'"):
        load_config(None, ["reward.token_selection=tokens"], complete=False)
    scores, _ = random_scores()
    with pytest.raises(ValueError, match="needs the completions' parts"):
        select_tokens("answer", scores.entropy, scores.mask)
