"""The no-grad passes over prompt + completion: policy scoring (log-probs, entropies, region masses) and the
reference model's log-probs. Results exist on the last pipeline stage; other stages get None.

Index conventions (docs/spec.md §3): sequences are [N, S] with the prompt in columns [0, P) and completion
token j at column P + j. Its log-prob and the entropy of the distribution it was sampled from come from the
logits at column P + j - 1; its attention row is the query at column P + j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_sayo.attention.region_mass import score_region_mass
from megatron_sayo.models.qwen25vl.model import model_inputs
from megatron_sayo.rl.logprobs import vocab_parallel_logprobs_and_entropy
from megatron_sayo.distributed.schedule import run_forward


@dataclass
class RolloutBatch:
    """What the passes need: sequences, masks, pixels per row, and the region of each row."""

    sequences: torch.Tensor        # [N, S]
    attention_mask: torch.Tensor   # [N, S]
    prompt_length: int             # P
    completion_mask: torch.Tensor  # [N, T]
    pixel_values: list[torch.Tensor]   # per row
    image_grid_thw: list[torch.Tensor]  # per row, [n_images, 3]
    region_mask: torch.Tensor      # [N, S] region keys (prompt columns only)

    def microbatches(self, hf, size: int, with_probe: bool) -> list[dict]:
        """Forward inputs in chunks of `size` rows, plus the probe's masks when asked."""
        out = []
        for start in range(0, self.sequences.shape[0], size):
            rows = slice(start, start + size)
            ids, mask = self.sequences[rows], self.attention_mask[rows]
            mb = dict(rows=rows, inputs=model_inputs(hf, ids, mask, torch.cat(self.pixel_values[rows]),
                                                     torch.cat(self.image_grid_thw[rows])))
            mb["inputs"]["logits_from"] = self.prompt_length - 1  # only completion tokens are scored
            if with_probe:
                query = torch.zeros_like(mask, dtype=torch.bool)
                query[:, self.prompt_length:] = self.completion_mask[rows].bool()
                mb.update(query_rows=query, region_mask=self.region_mask[rows], image_mask=ids == hf.tokens.image)
            out.append(mb)
        return out


@dataclass
class Scores:
    """Per completion row (last stage): token log-probs [N, T] and full-sequence arrays [N, S]."""

    logp: torch.Tensor
    entropy: torch.Tensor        # [N, S], indexed by logits column
    region_mass: torch.Tensor    # [N, S] a(t), indexed by query column
    image_mass: torch.Tensor     # [N, S] v(t)


def completion_logits(logits: torch.Tensor, seq_len: int, prompt_length: int) -> torch.Tensor:
    """[b, T, V/tp] logits that predict the completion tokens, from the model's [s', b, V/tp] output, which
    covers the last s' <= seq_len positions (see Qwen25VLModel.forward's logits_from)."""
    first = seq_len - logits.shape[0]
    return logits.transpose(0, 1)[:, prompt_length - 1 - first:-1]


def _token_stats(model, logits: torch.Tensor, mb: dict, prompt_length: int, temperature: float):
    """(completion log-probs [b, T], entropy [b, S] indexed by logits column, 0 before P - 1)."""
    ids = mb["inputs"]["input_ids"]
    z = completion_logits(logits, ids.shape[1], prompt_length).float()
    logp, ent = vocab_parallel_logprobs_and_entropy(z, ids[:, prompt_length:], temperature=temperature,
                                                    vocab_size=model.vocab_size)
    entropy = ent.new_zeros(ids.shape)
    entropy[:, prompt_length - 1:-1] = ent
    return logp, entropy


def score_policy(model, batch: RolloutBatch, micro_batch: int, temperature: float) -> Scores | None:
    """Log-probs, entropies and last-layer region/image masses of the completions, in one no-grad pass."""
    model.eval()

    def collect(logits, mb):
        return _token_stats(model, logits, mb, batch.prompt_length, temperature)

    scored = score_region_mass(model, batch.microbatches(model.hf, micro_batch, with_probe=True), collect)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return Scores(logp=torch.cat([s.output[0] for s in scored]), entropy=torch.cat([s.output[1] for s in scored]),
                  region_mass=torch.cat([s.region_mass for s in scored]),
                  image_mass=torch.cat([s.image_mass for s in scored]))


def reference_logprobs(model, batch: RolloutBatch, micro_batch: int, temperature: float) -> torch.Tensor | None:
    """The frozen reference policy's completion log-probs [N, T] (last stage)."""
    model.eval()
    out = run_forward(model, batch.microbatches(model.hf, micro_batch, with_probe=False),
                      lambda logits, mb: _token_stats(model, logits, mb, batch.prompt_length, temperature)[0])
    return torch.cat(out) if parallel_state.is_pipeline_last_stage() else None
