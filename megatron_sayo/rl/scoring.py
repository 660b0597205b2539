"""The teacher-forced no-grad passes over prompt + completion: policy scoring (log-probs, entropies, region
masses) and the reference model's log-probs, as CompletionScores (docs/spec.md §3; alignment in rl/batch.py).
Results exist on the last pipeline stage; other stages get None.
"""

from __future__ import annotations

from typing import Literal

import torch
from megatron.core import parallel_state

from megatron_sayo.attention.region_mass import score_region_mass
from megatron_sayo.distributed.schedule import run_forward
from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.rl.batch import ScoringBatch, completion_view
from megatron_sayo.rl.logprobs import vocab_parallel_logprobs_and_entropy


def completion_logits(logits: torch.Tensor, seq_len: int, prompt_length: int) -> torch.Tensor:
    """[b, T, V/tp] logits that predict the completion tokens, from the model's [s', b, V/tp] output, which
    covers the last s' <= seq_len positions (see Qwen25VLModel.forward's logits_from)."""
    first = seq_len - logits.shape[0]
    return completion_view(logits.transpose(0, 1), prompt_length, seq_len - prompt_length, "logits", first)


def microbatch_completion_logits(logits: torch.Tensor, mb: dict, prompt_length: int
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, T, V/tp] logits that predict the microbatch rows' completion tokens, the tokens [n, T]), from the
    model's output of an unshared microbatch (rows as they are) or a packed one (mb["layout"], gathered)."""
    ids = mb["inputs"]["input_ids"]
    layout = mb.get("layout")
    if layout is None:
        return completion_logits(logits, ids.shape[1], prompt_length), ids[:, prompt_length:]
    first = ids.shape[1] - logits.shape[0]
    return layout.gather(logits.transpose(0, 1), "logits", first), mb["targets"].to(logits.device)


def _token_stats(model, logits: torch.Tensor, mb: dict, prompt_length: int, temperature: float):
    """(log-probs [b, T], entropies [b, T]) of the microbatch's completion tokens."""
    z, targets = microbatch_completion_logits(logits, mb, prompt_length)
    return vocab_parallel_logprobs_and_entropy(z.float(), targets, temperature=temperature,
                                               vocab_size=model.vocab_size)


def _dense_key_weights(mass, rows: int, first_query: int, width: int) -> torch.Tensor:
    """[rows, T, S] head-mean image-key weights of each measured completion row (0 elsewhere); completion
    token 0's row is query column `first_query`."""
    out = mass.key_weights.new_zeros(rows, width, mass.key_weights.shape[1])
    out[mass.batch, mass.query - first_query] = mass.key_weights
    return out


def _shared_key_weights(mass, layout, by: str, prompt_length: int, width: int) -> torch.Tensor:
    """[n, T, P + T] head-mean image-key weights of each covered row's completion tokens from a packed
    microbatch's measurement (image keys are prompt columns, the same in both layouts)."""
    b, s = layout.segments.shape
    dense = mass.key_weights.new_zeros(b, s, mass.key_weights.shape[1])
    dense[mass.batch, mass.query] = mass.key_weights
    picked = layout.gather(dense, by)[..., :prompt_length]
    return torch.cat([picked, picked.new_zeros(*picked.shape[:2], width)], dim=-1)


def score_policy(model, batch: ScoringBatch, micro_batch: int, temperature: float,
                 key_weights: bool = False, attention_row: Literal["token", "decision"] = "token",
                 shared: bool = False) -> CompletionScores | None:
    """Log-probs, entropies and last-layer region/image masses of the completions, in one no-grad pass.

    key_weights: also each completion row's head-mean attention over the image keys (for heatmaps).
    attention_row: the masses of each token's own row ("token", docs/spec.md §3) or of the row whose logits
    sampled it ("decision", reward.attention_row). shared: each group's prompt once (train.prompt_sharing).
    """
    model.eval()
    P, T = batch.prompt_length, batch.completion_mask.shape[1]

    def collect(logits, mb):
        return _token_stats(model, logits, mb, P, temperature)

    microbatches = batch.microbatches(model.hf, micro_batch, with_probe=True, attention_row=attention_row,
                                      shared=shared)
    scored = score_region_mass(model, microbatches, collect, key_weights=key_weights)
    rows_by = "query" if attention_row == "token" else "logits"
    first_query = P - (0 if attention_row == "token" else 1)     # the query column of completion token 0
    if not parallel_state.is_pipeline_last_stage():
        return None
    parts = []
    for mb, s in zip(microbatches, scored):
        mask = batch.completion_mask[mb["rows"]]
        layout = mb.get("layout")
        if layout is None:
            region, image = completion_view(s.region_mass, P, T, rows_by), completion_view(s.image_mass, P, T, rows_by)
            weights = _dense_key_weights(s.mass, mask.shape[0], first_query, T) if key_weights else None
        else:
            region, image = layout.gather(s.region_mass, rows_by), layout.gather(s.image_mass, rows_by)
            weights = _shared_key_weights(s.mass, layout, rows_by, P, T) if key_weights else None
        parts.append(CompletionScores(logprobs=s.output[0], entropy=s.output[1], mask=mask, region_mass=region,
                                      image_mass=image, key_weights=weights))
    return CompletionScores.cat(parts)


def reference_logprobs(model, batch: ScoringBatch, micro_batch: int, temperature: float, shared: bool = False
                       ) -> torch.Tensor | None:
    """The frozen reference policy's completion log-probs [N, T] (last stage; 0 on padding); shared: each
    group's prompt once (train.prompt_sharing)."""
    model.eval()
    out = run_forward(model, batch.microbatches(model.hf, micro_batch, with_probe=False, shared=shared),
                      lambda logits, mb: _token_stats(model, logits, mb, batch.prompt_length, temperature)[0])
    if not parallel_state.is_pipeline_last_stage():
        return None
    logp = torch.cat(out)
    return torch.where(batch.completion_mask.bool(), logp, torch.zeros((), dtype=logp.dtype))
