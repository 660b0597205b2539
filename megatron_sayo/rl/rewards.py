"""SAYO rewards (docs/spec.md §3-4): attention reward from region/image attention mass, format+length, accuracy.

Pure functions on per-completion-token arrays [B, T] (T = completion width, `mask` marks real tokens): the
attention reward reads a CompletionScores (inference/completion_scores.py; the position rule is rl/batch.py's)
and nothing else.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from fractions import Fraction

import torch

from megatron_sayo.config import RewardConfig, RewardWeights
from megatron_sayo.inference.completion_scores import CompletionScores

_R = RewardConfig  # defaults below come from the config dataclass (one source of truth)


# --------------------------------------------------------------------------------------------------------------
# Attention reward
# --------------------------------------------------------------------------------------------------------------

def top_k_count(n: int, ratio: float) -> int:
    """k = max(1, floor(ratio * n)) for n > 0 (0 for n = 0); ratio read as the decimal it was written as."""
    return 0 if n <= 0 else max(1, math.floor(Fraction(str(ratio)) * n))


def select_top_entropy(entropy: torch.Tensor, mask: torch.Tensor,
                       ratio: float = _R.top_entropy_ratio) -> torch.Tensor:
    """bool [B, T]: per row the k highest-entropy real tokens, k = top_k_count(n real tokens, ratio).

    Padding (mask False) is never selected. Ties go to the earlier position (stable descending sort).
    """
    mask = mask.bool()
    keyed = entropy.double().masked_fill(~mask, float("-inf"))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    k = torch.tensor([top_k_count(int(n), ratio) for n in mask.sum(1)], device=mask.device)
    return (rank < k.view(-1, 1)) & mask


TOKEN_SELECTIONS = ("entropy", "all", "reasoning", "answer")


def answer_block(text: str) -> tuple[int, int, int] | None:
    """(start of its <answer> tag, start and end of its content) of the last complete <answer>...</answer> block
    (the one extract_answer reads), or None."""
    matches = list(_ANSWER.finditer(text))
    last = matches[-1] if matches else None
    return None if last is None else (last.start(), last.start(1), last.end(1))


def token_parts(char_ends: list[int], text: str) -> tuple[list[bool], list[bool]]:
    """(reasoning, answer) flags of tokens whose decoded text ends at `char_ends` (cumulative) in `text`:
    reasoning = ends at or before the last answer block's <answer> tag (every token when there is no block),
    answer = overlaps the block's content. A token straddling the tag is in neither."""
    block = answer_block(text)
    starts = [0, *char_ends[:-1]]
    if block is None:
        return [True] * len(char_ends), [False] * len(char_ends)
    tag, lo, hi = block
    return ([e <= tag for e in char_ends], [s < hi and e > lo for s, e in zip(starts, char_ends)])


def completion_parts(completion_ids: torch.Tensor, lengths: torch.Tensor, decode) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """bool [B, T] (reasoning, answer) token flags of completions, `decode(ids) -> str` as the rewards decode
    them (token_parts on the cumulative decoded lengths); padding is in neither."""
    reasoning = torch.zeros(completion_ids.shape, dtype=torch.bool, device=completion_ids.device)
    answer = torch.zeros_like(reasoning)
    for row, n in enumerate(lengths.tolist()):
        ids = completion_ids[row, :n].tolist()
        ends = [len(decode(ids[:j + 1])) for j in range(n)]
        r, a = token_parts(ends, decode(ids))
        reasoning[row, :n] = torch.tensor(r, dtype=torch.bool)
        answer[row, :n] = torch.tensor(a, dtype=torch.bool)
    return reasoning, answer


def select_tokens(selection: str, entropy: torch.Tensor, mask: torch.Tensor, ratio: float = _R.top_entropy_ratio,
                  parts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """bool [B, T], reward.token_selection: 'entropy' the top `ratio` by entropy (select_top_entropy), 'all'
    every real token, 'reasoning' / 'answer' the real tokens flagged in parts = completion_parts(...)."""
    mask = mask.bool()
    if selection == "entropy":
        return select_top_entropy(entropy, mask, ratio)
    if selection == "all":
        return mask
    if selection in ("reasoning", "answer"):
        if parts is None:
            raise ValueError(f"reward.token_selection = {selection}: needs the completions' parts (completion_parts)")
        return parts[0 if selection == "reasoning" else 1].to(mask.device).bool() & mask
    raise ValueError(f"reward.token_selection must be one of {', '.join(TOKEN_SELECTIONS)}, got {selection!r}")


def attention_reward(region_mass: torch.Tensor, image_mass: torch.Tensor, selected: torch.Tensor,
                     form: str = _R.attention_form, eps: float = _R.eps) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_attn [B], TAS [B]): pool a and v over the selected tokens, x = (A + eps)/(V + eps), then the form.

    form 'paper': x^2 / (1 + x^2) = (1 + tanh(log x)) / 2; 'code': tanh(log x). TAS is x.
    Inputs are the per-key means a(t), v(t) of docs/spec.md §3 (not head- or key-summed masses).
    A row with no selected token pools to A = V = 0, so x = 1.
    """
    sel = selected.to(torch.float64)
    count = sel.sum(1).clamp(min=1.0)
    pooled_a = (region_mass.double() * sel).sum(1) / count
    pooled_v = (image_mass.double() * sel).sum(1) / count
    x = (pooled_a + eps) / (pooled_v + eps)
    if form == "paper":
        reward = torch.sigmoid(2.0 * torch.log(x))  # = x^2 / (1 + x^2) without overflow
    elif form == "code":
        reward = torch.tanh(torch.log(x))
    else:
        raise ValueError(f"attention reward form must be 'paper' or 'code', got {form!r}")
    out = torch.promote_types(region_mass.dtype, torch.float32)
    return reward.to(out), x.to(out)


# --------------------------------------------------------------------------------------------------------------
# Format, answer extraction, accuracy, total
# --------------------------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(text: str, n_tokens: int, long_bound: int = _R.format_long_bound,
                  short_bound: int = _R.format_short_bound, factor: float = _R.format_factor) -> float:
    """1 if `text` has <answer>...</answer>, times long * short length factors on n_tokens (docs/spec.md §4)."""
    if not _ANSWER.search(text):
        return 0.0
    long = 1.0 if n_tokens <= long_bound else max(0.0, factor * long_bound / n_tokens)
    short = 1.0 if n_tokens >= short_bound else max(0.0, factor * n_tokens / short_bound)
    return long * short


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces nested; None if absent or unbalanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str) -> str | None:
    """The last <answer>...</answer> (a \\boxed{} inside it unwrapped), else the last \\boxed{...}; stripped."""
    tagged = _ANSWER.findall(text)
    if tagged:
        inner = tagged[-1]
        boxed = _last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    boxed = _last_boxed(text)
    return None if boxed is None else boxed.strip()


def normalize_answer(text: str) -> str:
    """Lower case; punctuation (except a '.' between digits) and articles a/an/the dropped; spaces collapsed."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text.lower())
    text = "".join(" " if c in string.punctuation and c != "." else c for c in text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def parse_number(text: str) -> float | None:
    """'1,234.5', '$3', '45%', '-2/3' -> float; None if not a number."""
    s = re.sub(r"[,\s$%]", "", text)
    try:
        if re.fullmatch(r"[-+]?\d+/\d+", s):
            num, den = s.split("/")
            return int(num) / int(den) if int(den) else None
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def accuracy_reward(pred: str | None, ref: str, mode: str = _R.accuracy_match) -> float:
    """1.0 if `pred` matches `ref`: 'exact' (after strip), 'normalized', or 'numeric' (rel 1e-6, else normalized)."""
    if pred is None:
        return 0.0
    if mode == "exact":
        return float(pred.strip() == ref.strip())
    if mode == "numeric":
        p, r = parse_number(pred), parse_number(ref)
        if p is not None and r is not None:
            return float(math.isclose(p, r, rel_tol=1e-6, abs_tol=1e-9))
        return accuracy_reward(pred, ref, "normalized")
    if mode == "normalized":
        return float(normalize_answer(pred) == normalize_answer(ref))
    raise ValueError(f"accuracy match must be 'exact', 'normalized' or 'numeric', got {mode!r}")


def text_rewards(texts: list[str], lengths: list[int], references: list[str], cfg: RewardConfig
                 ) -> tuple[list[float], list[float]]:
    """(format, accuracy) reward of each decoded completion of `lengths` tokens against its reference answer."""
    fmt = [format_reward(text, n, cfg.format_long_bound, cfg.format_short_bound, cfg.format_factor)
           for text, n in zip(texts, lengths, strict=True)]
    acc = [accuracy_reward(extract_answer(text), ref, cfg.accuracy_match)
           for text, ref in zip(texts, references, strict=True)]
    return fmt, acc


def total_reward(components: Mapping[str, torch.Tensor], weights: RewardWeights | Mapping[str, float]
                 ) -> torch.Tensor:
    """sum_k weight_k * components[k]; a term with weight 0 may be absent, one with a weight must be present."""
    weights = weights if isinstance(weights, Mapping) else vars(weights)
    unknown = set(components) - set(weights)
    if unknown:
        raise KeyError(f"reward terms without a weight: {sorted(unknown)}; weighted terms: {sorted(weights)}")
    total = None
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name not in components:
            raise KeyError(f"reward term {name!r} has weight {weight} but was not computed")
        term = weight * torch.as_tensor(components[name], dtype=torch.float64)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("all reward weights are 0")
    return total


def sequence_attention_reward(scores: CompletionScores, ratio: float = _R.top_entropy_ratio,
                              form: str = _R.attention_form, eps: float = _R.eps,
                              selection: str = _R.token_selection, parts=None):
    """select -> reward in one call: (reward [B], tas [B], selected [B, T]) from a scoring's masses/entropies;
    `selection` and `parts` as select_tokens."""
    if scores.region_mass is None or scores.image_mass is None:
        raise ValueError("the attention reward needs region and image masses (score with the region probe)")
    selected = select_tokens(selection, scores.entropy, scores.mask, ratio, parts)
    reward, tas = attention_reward(scores.region_mass, scores.image_mass, selected, form, eps)
    return reward, tas, selected
