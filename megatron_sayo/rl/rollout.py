"""Batched KV-cached generation for GRPO rollouts on Qwen25VLModel, under TP and PP.

One prefill over the left-padded prompts (images through the vision tower once) fills a per-layer KV
cache; for G completions per prompt the cache rows are then repeated. Each decode step feeds one token per
row with its 3-D M-RoPE position (index among the row's real tokens + rope_delta, the same on all three
channels). The last pipeline stage gathers the last position's vocab-parallel logits, and each of its TP
ranks samples (temperature, then top-p) from the same gathered logits with the same seeded generator, so they
draw the same ids without a broadcast (as Megatron-LM's text generation does); a PP broadcast from the last
stage then gives every stage the ids it feeds at the next step.

`Rollout.logprobs` are log softmax(logits / temperature) of the chosen ids over the vocabulary they were drawn
from (suppressed ids removed, before top-p truncation; temperature 1 when greedy).
With `top_logprobs=k` the rollout also keeps the model's own distribution (log softmax of the raw logits, no
temperature, no top-p; what OpenAI-style `logprobs` report): the chosen ids' log-probs and the k most likely.
`on_step` lets a caller end rows early (stop strings) and watch tokens as they come (streaming).

Capture (`capture_region` given, docs/spec.md §3): the rollout also records what a teacher-forced scoring pass
would compute, as `Rollout.scores` (CompletionScores, last pipeline stage): per new token its log-prob and the
entropy of the full distribution softmax(logits / temperature) it was sampled from (logits column p - 1),
and the last layer's region / image attention mass of its own row (query column p), measured while the token
is fed in the next decode step (a row that stops is fed once more, then leaves the cache; when every row
has stopped, that last feed stops at the last layer's attention, where the probe reads it). Each step keeps
the masses over this rank's heads; one all-reduce over TP at the end of the rollout makes them the mean over
all heads. The sampler draws for exactly the rows it draws for without capture, so the same seed gives the
same completions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_sayo.attention.region_mass import DecodeMassProbe
from megatron_sayo.distributed import runtime, shm_collectives
from megatron_sayo.models.qwen25vl.attention import AttentionState, KVCache, build_attention_mask
from megatron_sayo.models.qwen25vl.rope import get_rope_index
from megatron_sayo.rl.batch import CompletionScores


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


@dataclass
class Rollout:
    """Prompts (left-padded) + completions (right-padded with pad_id); N = prompts x G rows."""

    sequences: torch.Tensor         # [N, P + T] prompt then completion
    attention_mask: torch.Tensor    # [N, P + T] prompt mask then completion_mask
    prompt_length: int              # P
    completion_ids: torch.Tensor    # [N, T]
    completion_mask: torch.Tensor   # [N, T] 1 up to and including the stop token
    completion_lengths: torch.Tensor  # [N]
    group_ids: torch.Tensor         # [N] prompt index of each row
    logprobs: torch.Tensor          # [N, T] log p(token) under softmax(logits / T); 0 where masked
    finished: torch.Tensor          # [N] True where a stop token (or on_step) ended the row (False: length stop)
    raw_logprobs: torch.Tensor | None = None   # [N, T] log softmax(raw logits) of the chosen ids (top_logprobs set)
    top_ids: torch.Tensor | None = None        # [N, T, k] the k most likely ids under the raw logits
    top_logprobs: torch.Tensor | None = None   # [N, T, k] their raw log-probs
    scores: CompletionScores | None = None     # captured at decode (last pipeline stage, capture on)


# ------------------------------------------------------------------------------------------ sampling

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
    scaled = logits.float() / (1.0 if params.greedy else params.temperature)   # a new tensor: edited below
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


# ------------------------------------------------------------------------------------------ parallel plumbing

def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def _is_sampler() -> bool:
    """The last pipeline stage: its TP ranks hold the same gathered logits and draw the same tokens."""
    return parallel_state.is_pipeline_last_stage()


def raw_top(logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """[1 + 2k, n] float64: log softmax(raw logits) of `ids`, then the top-k ids, then their log-probs."""
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(k, dim=-1) if k else None
    rows = [logp.gather(-1, ids[:, None]).T.double()]
    if top is not None:
        rows += [top.indices.T.double(), top.values.T.double()]
    return torch.cat(rows)


def share_from_sampler(packed: torch.Tensor) -> torch.Tensor:
    """`packed` as filled on the last stage, on every stage (PP broadcast; its TP ranks filled it alike)."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if _world(pp_group) > 1:
        dist.broadcast(packed, parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return packed


def _last_logits(model, parallel_logits: torch.Tensor) -> torch.Tensor:
    """[s, b, V/tp] vocab-parallel logits -> [b, vocab] of the last position, gathered over TP."""
    last = parallel_logits[-1]
    if _world(parallel_state.get_tensor_model_parallel_group()) > 1:
        last = tensor_parallel.gather_from_tensor_model_parallel_region(last)
    return last[:, :model.vocab_size]


def forward_last(model, inputs: dict, logits: bool = True) -> torch.Tensor | None:
    """Last-position full-vocab logits [b, V] on the last stage (None elsewhere); PP runs megatron's schedule.
    `logits=False`: run the layers only (for the attention probe), no output layer, returns None."""
    if not logits:
        inputs = dict(inputs, hidden_only=True)
    collect = (lambda out, mb: _last_logits(model, out)) if logits else (lambda out, mb: None)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        with torch.no_grad():
            return collect(model(**inputs), None)
    from megatron_sayo.distributed.schedule import run_forward

    out = run_forward(model, [dict(inputs=inputs)], collect=collect)
    return out[0] if out else None


@contextmanager
def sequence_parallel_off(model):
    """Run with megatron sequence parallelism disabled (a 1-token decode step cannot be split over TP ranks).

    Plain TP computes the same values; layers cache the flag at init, so each module's copy and every
    config object are switched and restored.
    """
    saved = []
    for module in model.modules():
        for owner in (module, getattr(module, "config", None)):
            if owner is not None and getattr(owner, "sequence_parallel", False) is True:
                saved.append(owner)
                owner.sequence_parallel = False
    try:
        yield
    finally:
        for owner in saved:
            owner.sequence_parallel = True


# ------------------------------------------------------------------------------------------ generation

def decode_mask(real: torch.Tensor) -> torch.Tensor | None:
    """Megatron mask [n, 1, 1, sk] (True = masked) for one new query per row; None when nothing is padded."""
    if bool(real.all()):
        return None
    return ~real[:, None, None, :]


def stop_ids_tensor(model, params: SamplingParams, device) -> torch.Tensor:
    """The stop ids as a tensor: params.stop_token_ids, else the checkpoint's eos ids."""
    ids = params.stop_token_ids if params.stop_token_ids is not None else model.hf.tokens.eos
    return torch.tensor(list(ids), dtype=torch.long, device=device)


StepHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def generate(model, batch: dict, params: SamplingParams, *, num_return_sequences: int = 1,
             compact: bool = True, top_logprobs: int | None = None, on_step: StepHook | None = None,
             capture_region: torch.Tensor | None = None) -> Rollout:
    """G = num_return_sequences completions per prompt of a left-padded processor batch (every rank calls it).

    `compact` drops finished rows from the KV cache as they stop (cheaper steps, same result).
    `top_logprobs` (k >= 0): also record the raw-logit log-probs of the chosen ids and the k most likely ids.
    `on_step(rows, tokens, lengths)`: after each step, with the rows that just got a token, the [N, T] token
    buffer and the lengths; it returns a bool mask over `rows` of those to end now (or None). It runs on
    every rank with the same inputs and must decide the same there.
    `capture_region`: bool [prompts, P] region keys of each prompt; given, the rollout captures the scores
    (see the module docstring) into `Rollout.scores`.
    """
    with sequence_parallel_off(model):
        return _generate(model, batch, params, num_return_sequences, compact, top_logprobs, on_step,
                         capture_region)


def prefill(model, batch: dict, prompt_mask: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor | None,
                                                                                  torch.Tensor]:
    """Run the prompts once, filling `cache`: (last-position logits [b, V] on the sampler stage, rope_deltas [b])."""
    hf = model.hf
    position_ids, deltas = get_rope_index(batch["input_ids"], batch.get("image_grid_thw"), prompt_mask,
                                          image_token_id=hf.tokens.image, vision_start_token_id=hf.tokens.vision_start,
                                          spatial_merge_size=hf.vision.spatial_merge_size)
    logits = forward_last(model, dict(input_ids=batch["input_ids"], position_ids=position_ids,
                                      attention_mask=build_attention_mask(prompt_mask, prompt_mask.shape[1]),
                                      pixel_values=batch.get("pixel_values"),
                                      image_grid_thw=batch.get("image_grid_thw"), state=AttentionState(kv_cache=cache),
                                      logits_from=-1))
    return logits, deltas.reshape(-1).to(prompt_mask.device)


class _Capture:
    """Per-token arrays [n, steps] the capture fills: log-prob, entropy, region and image mass."""

    def __init__(self, model, region: torch.Tensor, image: torch.Tensor, n: int, steps: int, temperature: float):
        self.region, self.image = region, image          # bool [n, P] per rollout row
        self.temperature = temperature
        self.num_layers = model.config.num_layers
        self.values = torch.zeros(4, n, steps, dtype=torch.float32, device=region.device)
        self.probe: DecodeMassProbe | None = None
        self.probe_rows: torch.Tensor | None = None

    def state(self, cache: KVCache, active: torch.Tensor, probe_only: bool = False) -> AttentionState:
        """The decode step's attention state: the cache and a probe over the fed rows' prompt keys (this
        rank's heads only: `scores` reduces over TP once); the probe is kept while the fed rows stay.
        `probe_only`: the step is fed only for the probe (the last one, every row stopped)."""
        if self.probe is None or self.probe_rows is not active:
            self.probe = DecodeMassProbe(self.region[active], self.image[active], group=None)
            self.probe_rows = active
        return AttentionState(kv_cache=cache, probe=self.probe, probe_layer=self.num_layers, probe_only=probe_only)

    def record_masses(self, active: torch.Tensor, live: torch.Tensor, step: int) -> None:
        means = self.probe.means if self.probe is not None else None
        if means is not None:   # the last pipeline stage
            self.values[2:4, active, step] = torch.where(live, means.to(self.values), torch.zeros(()))

    def scores(self, completion_mask: torch.Tensor) -> CompletionScores | None:
        if not parallel_state.is_pipeline_last_stage():
            return None
        t = completion_mask.shape[1]
        masses = self.values[2:4, :, :t].contiguous()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if _world(tp_group) > 1:     # local-head means -> the mean over all heads
            shm_collectives.all_reduce(masses, tp_group).div_(_world(tp_group))
        logp, entropy = self.values[:2, :, :t]
        region, image = masses
        return CompletionScores(logprobs=logp, entropy=entropy, region_mass=region, image_mass=image,
                                mask=completion_mask)


def _generate(model, batch: dict, params: SamplingParams, num_return_sequences: int, compact: bool,
              top_k: int | None = None, on_step: StepHook | None = None,
              capture_region: torch.Tensor | None = None) -> Rollout:
    """generate's body (sequence parallelism already off)."""
    input_ids = batch["input_ids"]
    device = input_ids.device
    prompt_mask = batch.get("attention_mask")
    prompt_mask = torch.ones_like(input_ids) if prompt_mask is None else prompt_mask.to(device)
    if bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError("generate: prompts must be left-padded (the last column has padding)")
    g, steps = num_return_sequences, params.max_new_tokens
    b, p = input_ids.shape
    if capture_region is not None and tuple(capture_region.shape) != (b, p):
        raise ValueError(f"generate: capture_region is {tuple(capture_region.shape)}, the prompts are {(b, p)}")
    pad_id = model.hf.tokens.pad if model.hf.tokens.pad is not None else model.hf.tokens.eos[0]
    cache = KVCache(max_len=p + steps)
    state = AttentionState(kv_cache=cache)
    logits, deltas = prefill(model, batch, prompt_mask, cache)

    rows = torch.arange(b, device=device).repeat_interleave(g)
    if g > 1:
        cache.select(rows)
        logits = logits[rows] if logits is not None else None
    n = b * g
    real = torch.cat([prompt_mask[rows].bool(), torch.ones(n, steps, dtype=torch.bool, device=device)], dim=1)
    next_pos = prompt_mask[rows].sum(-1) + deltas[rows]       # M-RoPE position of the first new token
    stop_ids = stop_ids_tensor(model, params, device)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    capture = None
    if capture_region is not None:
        capture = _Capture(model, capture_region.to(device).bool()[rows], (input_ids == model.hf.tokens.image)[rows],
                           n, steps, 1.0 if params.greedy else params.temperature)
    shared = 2 + (0 if capture is None else 2) + (0 if top_k is None else 1 + 2 * top_k)

    tokens = torch.full((n, steps), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, steps, dtype=torch.float32, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    if top_k is not None:
        raw = torch.zeros(n, steps, dtype=torch.float32, device=device)
        top_ids = torch.zeros(n, steps, top_k, dtype=torch.long, device=device)
        top_lp = torch.zeros(n, steps, top_k, dtype=torch.float32, device=device)
    active = torch.arange(n, device=device)          # rows still in the cache, in cache order
    for step in range(steps):
        # without capture (compact) every cached row is unfinished; with it, rows that stopped last step were
        # fed once more and are skipped here, so the generator draws for the same rows either way
        drawn = ~finished[active] if compact else torch.ones_like(active, dtype=torch.bool)
        packed = torch.zeros(shared, int(drawn.sum()), dtype=torch.float64, device=device)
        if _is_sampler():
            sub = logits[drawn]
            ids, logp = sample_tokens(sub, params, generator)
            parts = [ids.double()[None], logp.double()[None]]
            if capture is not None:
                parts.append(torch.stack(token_stats(sub, ids, capture.temperature)).double())
            if top_k is not None:
                parts.append(raw_top(sub, ids, top_k))
            packed = torch.cat(parts)
        drawn_values = share_from_sampler(packed)
        packed = torch.zeros(shared, active.numel(), dtype=torch.float64, device=device)
        packed[:, drawn] = drawn_values
        live = ~finished[active]
        ids = torch.where(live, packed[0].long(), torch.full_like(active, pad_id))
        tokens[active, step] = ids
        logprobs[active, step] = torch.where(live, packed[1].float(), torch.zeros(()))
        if capture is not None:
            capture.values[:2, active, step] = torch.where(live, packed[2:4].float(), torch.zeros(()))
        if top_k is not None:
            first = 4 if capture is not None else 2
            raw[active, step] = packed[first].float()
            top_ids[active, step] = packed[first + 1:first + 1 + top_k].T.long()
            top_lp[active, step] = packed[first + 1 + top_k:].T.float()
        lengths[active] += live.long()
        finished[active] |= live & torch.isin(ids, stop_ids)
        if on_step is not None and bool(live.any()):
            stepped = active[live]
            halt = on_step(stepped, tokens, lengths)
            if halt is not None:
                finished[stepped[halt]] = True
        last = step == steps - 1 or bool(finished.all())
        if last and capture is None:
            break
        if compact:
            keep = live if capture is not None else ~finished[active]
            if not bool(keep.all()):
                cache.select(keep.nonzero().squeeze(-1))
                active, ids, live = active[keep], ids[keep], live[keep]
        width = p + step + 1
        logits = forward_last(model, dict(
            input_ids=ids[:, None], position_ids=(next_pos[active] + step).view(1, -1, 1).expand(3, -1, -1),
            attention_mask=decode_mask(real[active, :width]),
            state=state if capture is None else capture.state(cache, active, probe_only=last)), logits=not last)
        if capture is not None:
            capture.record_masses(active, live, step)
        if last:
            break

    t = int(lengths.max()) if n else 0
    completion_ids = tokens[:, :t]
    completion_mask = (torch.arange(t, device=device)[None] < lengths[:, None]).long()
    return Rollout(sequences=torch.cat([input_ids[rows], completion_ids], dim=1),
                   attention_mask=torch.cat([prompt_mask[rows].long(), completion_mask], dim=1),
                   prompt_length=p, completion_ids=completion_ids, completion_mask=completion_mask,
                   completion_lengths=lengths, group_ids=rows.clone(), logprobs=logprobs[:, :t],
                   finished=finished, scores=None if capture is None else capture.scores(completion_mask),
                   **({} if top_k is None else dict(raw_logprobs=raw[:, :t], top_ids=top_ids[:, :t],
                                                    top_logprobs=top_lp[:, :t])))
