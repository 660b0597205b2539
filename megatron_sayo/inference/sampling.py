"""How the sampler draws a token from full-vocab logits: SamplingParams, top-p, temperature sampling, the captured
log-prob / entropy and the raw-logit top-k, gathered into one decode step's StepDraw.

Log-probs of the chosen ids are log softmax(logits / temperature) over the vocabulary they were drawn from
(suppressed ids removed, before top-p truncation; temperature 1 when greedy). The raw top-k is the model's own
distribution (log softmax of the raw logits, no temperature, no top-p): what OpenAI-style `logprobs` report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sayo.distributed import runtime
from megatron_sayo.inference.step_draw import StepDraw


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn; stop_token_ids None means the checkpoint's eos ids.

    The same seed gives the same tokens on every data-parallel rank: vary it per step and DP rank."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    stop_token_ids: tuple[int, ...] | None = None
    seed: int = 0
    suppress_token_ids: tuple[int, ...] = ()   # never sampled (e.g. vision placeholders a policy must not emit)

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def scoring_temperature(self) -> float:
        """The temperature log-probs and entropies are taken at: 1 when greedy."""
        return 1.0 if self.greedy else self.temperature


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest top set of cumulative prob >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    order = runtime.argsort_descending(logits)
    sorted_logits = logits.gather(-1, order)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs          # mass of the strictly more likely tokens
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False                    # always keep the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n], log-probs [n]) from full-vocab logits [n, V]: argmax or temperature + top-p sampling."""
    scaled = logits.float() / params.scoring_temperature   # a new tensor: edited below
    if not bool(torch.isfinite(scaled.amax(dim=-1)).all()):  # a NaN or inf somewhere, or a row of -inf
        # a diverged policy: keep the rollout going (every rank waits for these ids); the trainer then sees
        # the non-finite loss and skips the step
        scaled = torch.nan_to_num(scaled, nan=float("-inf"))
        scaled[~torch.isfinite(scaled).any(-1)] = 0.0
    if params.suppress_token_ids:
        scaled[:, list(params.suppress_token_ids)] = float("-inf")
    if params.greedy:
        ids = scaled.argmax(dim=-1)
    else:
        probs = top_p_filter(scaled, params.top_p).softmax(dim=-1)
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logp = scaled.log_softmax(dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    return ids, logp


def token_stats(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(ids), entropy) of the full distribution softmax(logits / temperature) [n, V], in float32: what
    teacher-forced scoring computes for the same tokens (no suppression, no top-p)."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    return z.gather(-1, ids[:, None]).squeeze(-1) - lse, lse - (p * z).sum(-1)


def raw_top(logits: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log softmax(raw logits) of `ids` [n], the k most likely ids [n, k], their log-probs [n, k])."""
    logp = logits.float().log_softmax(dim=-1)
    if k:
        top = logp.topk(k, dim=-1)
        top_ids, top_logprobs = top.indices, top.values
    else:
        top_ids = torch.zeros(logp.shape[0], 0, dtype=torch.long, device=logp.device)
        top_logprobs = logp.new_zeros(logp.shape[0], 0)
    return logp.gather(-1, ids[:, None]).squeeze(-1), top_ids, top_logprobs


def draw_step(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, *,
              capture: bool = False, top_k: int | None = None) -> StepDraw:
    """One decode step's draw for the rows of `logits` [n, V]: the sampled ids and their log-probs, with
    `capture` their log-prob and entropy at the scoring temperature, with `top_k` the raw-logit top-k."""
    ids, logp = sample_tokens(logits, params, generator)
    draw = StepDraw(ids=ids, logprobs=logp)
    if capture:
        draw.capture_logprobs, draw.entropy = token_stats(logits, ids, params.scoring_temperature)
    if top_k is not None:
        draw.raw_logprobs, draw.top_ids, draw.top_logprobs = raw_top(logits, ids, top_k)
    return draw
