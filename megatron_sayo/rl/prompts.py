"""Grounded samples -> prompt batches (chat template, pixels) with each row's region token mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_sayo.data.grounded import GroundedSample
from megatron_sayo.data.regions import RegionSpec, batch_region_mask


def reference_completion(sample: GroundedSample) -> str:
    """The completion the supervised warm-up teaches: the row's reasoning (when it has one), then the answer in
    the SAYO format (docs/spec.md §4)."""
    answer = f"<answer>{sample.answer}</answer>"
    return f"{sample.reasoning} {answer}" if sample.reasoning else answer


class PromptStream:
    """Endless, seeded, epoch-shuffled order over n samples; `position` counts prompts handed out."""

    def __init__(self, n: int, seed: int, position: int = 0):
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.position = n, seed, position

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        """The next k sample indices (crossing epochs as needed)."""
        out = [int(self._order((self.position + i) // self.n)[(self.position + i) % self.n]) for i in range(k)]
        self.position += k
        return out


def conversation(sample: GroundedSample, instruction: str) -> list[dict]:
    """One user turn: the image, then the question and the answer-format instruction."""
    text = f"{sample.question}\n{instruction}" if instruction else sample.question
    return [{"role": "user", "content": [{"type": "image", "image": sample.open_image()},
                                         {"type": "text", "text": text}]}]


@dataclass
class PromptBatch:
    """A left-padded prompt batch and, per row, the region's token positions as a bool mask [B, P]."""

    samples: list[GroundedSample]
    inputs: dict                 # input_ids, attention_mask, pixel_values, image_grid_thw
    region_mask: torch.Tensor


def check_text_tokens(inputs: dict, samples: list[GroundedSample], image_token_id: int, limit: int) -> None:
    """Raise ValueError naming the first sample whose prompt has more than `limit` tokens besides its image's
    (data.max_text_tokens: the memory check sized the run for it)."""
    real = inputs["attention_mask"].bool()
    text = (real & (inputs["input_ids"] != image_token_id)).sum(dim=1)
    for sample, n in zip(samples, text.tolist()):
        if n > limit:
            raise ValueError(f"sample {sample.id}: its prompt has {n} text tokens, more than data.max_text_tokens "
                             f"= {limit} (the length the memory check assumed); raise data.max_text_tokens and "
                             f"re-run --check, or shorten the question")


def build_prompt_batch(processor, samples: list[GroundedSample], image_token_id: int, merge_size: int,
                       patch_size: int, instruction: str, max_text_tokens: int | None = None) -> PromptBatch:
    """Tokenise the samples' conversations and locate each box's tokens from image_grid_thw; with
    `max_text_tokens`, a prompt with more text tokens than that is an error."""
    inputs = processor([conversation(s, instruction) for s in samples], padding_side="left")
    if max_text_tokens is not None:
        check_text_tokens(inputs, samples, image_token_id, max_text_tokens)
    specs = [RegionSpec(boxes=s.boxes, orig_size=tuple(s.image_size), sample_id=s.id) for s in samples]
    region = batch_region_mask(inputs["input_ids"], inputs["image_grid_thw"], image_token_id, specs,
                               merge_size=merge_size, patch_size=patch_size)
    return PromptBatch(samples, inputs, region)
