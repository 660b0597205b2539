"""Batched KV-cached generation on Qwen25VLModel, under TP and PP: prefill, the decode loop, `generate`.

One prefill over the left-padded prompts (images through the vision tower once) fills a per-layer KV
cache; for G completions per prompt the cache rows are then repeated. Each decode step feeds one token per
row with its 3-D M-RoPE position (index among the row's real tokens + rope_delta, the same on all three
channels). The last pipeline stage gathers the last position's vocab-parallel logits and draws (sampling.py);
what it drew goes to every stage as a StepDraw (step_draw.py), so each stage feeds the same ids next step.

`top_logprobs=k` also keeps the model's own distribution of each token (sampling.raw_top), `on_step` lets a
caller end rows early (stop strings) and watch tokens as they come (streaming), `capture_region` records the
scores a teacher-forced pass would compute (capture.py). The sampler draws for exactly the rows it draws for
without capture, so the same seed gives the same completions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_sayo.inference.capture import DecodeCapture
from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.inference.parallel import group_size, is_sampler, sequence_parallel_off
from megatron_sayo.inference.sampling import SamplingParams, draw_step
from megatron_sayo.inference.step_draw import draw_layout, share_draw
from megatron_sayo.models.qwen25vl.attention import AttentionState, KVCache, build_attention_mask
from megatron_sayo.models.qwen25vl.rope import get_rope_index


@dataclass
class Rollout:
    """Prompts (left-padded) + completions (right-padded with completion_pad_id); N = prompts x G rows."""

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

    def completion_texts(self, tokenizer) -> list[str]:
        """Each row's completion as text (its own tokens only, special tokens skipped)."""
        return [tokenizer.decode(self.completion_ids[row, :n].tolist(), skip_special_tokens=True)
                for row, n in enumerate(self.completion_lengths.tolist())]


# ------------------------------------------------------------------------------------------ forward

def _last_logits(model, parallel_logits: torch.Tensor) -> torch.Tensor:
    """[s, b, V/tp] vocab-parallel logits -> [b, vocab] of the last position, gathered over TP."""
    last = parallel_logits[-1]
    if group_size(parallel_state.get_tensor_model_parallel_group()) > 1:
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


# ------------------------------------------------------------------------------------------ generation

def decode_mask(real: torch.Tensor) -> torch.Tensor | None:
    """Megatron mask [n, 1, 1, sk] (True = masked) for one new query per row; None when nothing is padded."""
    if bool(real.all()):
        return None
    return ~real[:, None, None, :]


def completion_pad_id(hf) -> int:
    """The id completions are right-padded with: the checkpoint's pad id, else its first eos id."""
    return hf.tokens.pad if hf.tokens.pad is not None else hf.tokens.eos[0]


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
    pad_id = completion_pad_id(model.hf)
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
        capture = DecodeCapture(model, capture_region.to(device).bool()[rows],
                                (input_ids == model.hf.tokens.image)[rows], n, steps)
    layout = draw_layout(capture is not None, top_k)

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
        draw = None
        if is_sampler():
            draw = draw_step(logits[drawn], params, generator, capture=capture is not None, top_k=top_k)
        draw = share_draw(draw, layout, drawn)
        live = ~finished[active]
        ids = torch.where(live, draw.ids, torch.full_like(active, pad_id))
        tokens[active, step] = ids
        logprobs[active, step] = torch.where(live, draw.logprobs, torch.zeros(()))
        if capture is not None:
            capture.record_draw(draw, active, live, step)
        if top_k is not None:
            raw[active, step] = draw.raw_logprobs
            top_ids[active, step] = draw.top_ids
            top_lp[active, step] = draw.top_logprobs
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
