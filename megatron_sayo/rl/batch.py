"""`ScoringBatch`: prompt + completion rows as the teacher-forced passes see them (what they measure per token is
inference/completion_scores.py's `CompletionScores`).

Index conventions (docs/spec.md §3): sequences are [N, S], prompts left-padded into columns [0, P), completion
token j at column P + j, completions right-padded. Token j's log-prob and the entropy of the distribution it
was sampled from come from logits column P + j - 1; its attention row is query column P + j.
`completion_view` is the one place this rule is applied: after it every array is [N, T], column j = token j.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from megatron_sayo.models.qwen25vl.model import model_inputs
from megatron_sayo.models.qwen25vl.rope import tokens_per_image


def completion_view(values: torch.Tensor, prompt_length: int, width: int, by: Literal["query", "logits"],
                    first_column: int = 0) -> torch.Tensor:
    """[N, T, ...] columns of a per-position array [N, S', ...] that belong to completion tokens 0..T-1.

    by="query": the token's own column P + j (its attention row); by="logits": column P + j - 1 (the logits it
    was sampled from). `first_column` is the sequence column of values[:, 0] (arrays computed from a later
    position on, e.g. logits from column P - 1).
    """
    start = prompt_length - first_column - (1 if by == "logits" else 0)
    if start < 0 or start + width > values.shape[1]:
        raise ValueError(f"completion columns [{start}, {start + width}) by {by} are outside the {values.shape[1]} "
                         f"columns given (prompt length {prompt_length}, first column {first_column})")
    return values[:, start:start + width]


# ------------------------------------------------------------------------------------------------ batch

@dataclass
class ScoringBatch:
    """Rows of prompt + completion for the teacher-forced passes (scoring, reference, update)."""

    sequences: torch.Tensor             # [N, S]
    attention_mask: torch.Tensor        # [N, S]
    prompt_length: int                  # P
    completion_mask: torch.Tensor       # [N, T]
    pixel_values: list[torch.Tensor]    # per row (its images' patches)
    image_grid_thw: list[torch.Tensor]  # per row, [n_images, 3]
    region_mask: torch.Tensor           # bool [N, S] region keys (prompt columns only)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @classmethod
    def from_rollout(cls, rollout, prompts, hf) -> ScoringBatch:
        """Rollout rows (prompt rollout.group_ids[i] for row i) with their prompt's pixels and region."""
        rows = rollout.group_ids.tolist()
        pix, thw = images_per_prompt(prompts.inputs, hf)
        pix, thw = [pix[r] for r in rows], [thw[r] for r in rows]
        region = torch.zeros(rollout.sequences.shape, dtype=torch.bool, device=rollout.sequences.device)
        region[:, :rollout.prompt_length] = prompts.region_mask[torch.as_tensor(rows)]
        return cls(rollout.sequences, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask,
                   pix, thw, region)

    @classmethod
    def teacher_forced(cls, hf, prompt_inputs: dict, prompt_region: torch.Tensor | None,
                       completions: list[list[int]], pad_id: int) -> ScoringBatch:
        """Left-padded prompts (a processor batch) followed by the given completions, right-padded."""
        ids, mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
        if len(completions) != ids.shape[0]:
            raise ValueError(f"{len(completions)} completions for {ids.shape[0]} prompts")
        if not all(completions):
            raise ValueError("a completion is empty (nothing to score)")
        width = max(map(len, completions))
        completion = torch.tensor([c + [pad_id] * (width - len(c)) for c in completions], dtype=ids.dtype,
                                  device=ids.device)
        cmask = (torch.arange(width, device=ids.device)[None] <
                 torch.tensor([len(c) for c in completions], device=ids.device)[:, None]).to(mask.dtype)
        region = torch.zeros(ids.shape[0], ids.shape[1] + width, dtype=torch.bool, device=ids.device)
        if prompt_region is not None:
            region[:, :ids.shape[1]] = prompt_region.to(ids.device)
        pix, thw = images_per_prompt(prompt_inputs, hf)
        return cls(torch.cat([ids, completion], 1), torch.cat([mask, cmask], 1), ids.shape[1], cmask, pix, thw,
                   region)

    @classmethod
    def from_answers(cls, processor, hf, samples, instruction: str) -> ScoringBatch:
        """The samples' prompts followed by their reference answers in the SAYO format (the warm-up)."""
        from megatron_sayo.rl.prompts import build_prompt_batch, reference_completion

        prompts = build_prompt_batch(processor, samples, hf.tokens.image, hf.vision.spatial_merge_size,
                                     hf.vision.patch_size, instruction)
        tok = processor.tokenizer
        answers = [tok.encode(reference_completion(s)) + [hf.tokens.eos[0]] for s in samples]
        return cls.teacher_forced(hf, prompts.inputs, None, answers, tok.pad_id)

    @classmethod
    def from_completion(cls, hf, prompt_ids: list[int], completion_ids: list[int], pixel_values, image_grid_thw,
                        region_mask: torch.Tensor, device=None) -> ScoringBatch:
        """One row: an unpadded prompt, a given completion, its images and the prompt's region mask [P]."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      pixel_values=None if pixel_values is None else pixel_values.to(device),
                      image_grid_thw=None if image_grid_thw is None else image_grid_thw.to(device))
        return cls.teacher_forced(hf, inputs, torch.as_tensor(region_mask).bool()[None], [list(completion_ids)], 0)

    def microbatches(self, hf, size: int, with_probe: bool, attention_row: Literal["token", "decision"] = "token",
                     shared: bool = False) -> list[dict]:
        """Forward inputs in chunks of `size` rows (logits from column P - 1 on), plus the probe's masks: query
        rows at the completion tokens' own columns (attention_row "token") or one column earlier ("decision").

        Rows that hold the same pixel tensor (a prompt's G completions) send it to the vision tower once.
        shared: each chunk's runs of one prompt go as one packed row (rl/shared_prompt.py, train.prompt_sharing);
        every microbatch then carries `layout` and `targets` [n, T] for the rows it covers."""
        if shared:
            return self._shared_microbatches(hf, size, with_probe, attention_row)
        out = []
        for start in range(0, self.sequences.shape[0], size):
            rows = slice(start, start + size)
            ids, mask = self.sequences[rows], self.attention_mask[rows]
            pix, thw, order = distinct_images(self.pixel_values[rows], self.image_grid_thw[rows])
            every_thw = thw[order] if order is not None else thw
            mb = dict(rows=rows, inputs=model_inputs(hf, ids, mask, pix, every_thw))
            mb["inputs"].update(logits_from=self.prompt_length - 1, image_grid_thw=thw, image_order=order)
            if with_probe:
                query = torch.zeros_like(mask, dtype=torch.bool)
                first = self.prompt_length - (1 if attention_row == "decision" else 0)
                query[:, first:first + self.completion_mask.shape[1]] = self.completion_mask[rows].bool()
                mb.update(query_rows=query, region_mask=self.region_mask[rows], image_mask=ids == hf.tokens.image)
            out.append(mb)
        return out

    def _shared_microbatches(self, hf, size: int, with_probe: bool, attention_row: str) -> list[dict]:
        """`microbatches` with packed rows; all padded to one [rows, width] (pipeline stages exchange one shape)."""
        from megatron_sayo.rl import shared_prompt as sp

        N, P = self.sequences.shape[0], self.prompt_length
        groups = sp.prompt_groups(self.sequences, self.attention_mask, P, self.region_mask, self.pixel_values,
                                  self.image_grid_thw)
        chunks = [sp.pieces(groups, range(s, min(s + size, N))) for s in range(0, N, size)]
        width = max(sp.packed_width(self, c) for c in chunks)
        n_packed = max(len(c) for c in chunks)
        out = []
        for start, chunk in zip(range(0, N, size), chunks):
            rows = slice(start, start + size)
            ids, positions, region, layout = sp.pack(self, hf, chunk, width, n_packed)
            firsts = [piece[0] for piece in chunk]
            pix, thw, order = distinct_images([self.pixel_values[f] for f in firsts],
                                              [self.image_grid_thw[f] for f in firsts])
            inputs = dict(input_ids=ids, position_ids=positions, shared_segments=layout.segments,
                          pixel_values=pix, image_grid_thw=thw, image_order=order, logits_from=P - 1)
            mb = dict(rows=rows, inputs=inputs, layout=layout, targets=self.sequences[rows, P:])
            if with_probe:
                cmask = self.completion_mask[rows].bool().cpu()
                cols = layout.own_column if attention_row == "token" else layout.logits_column
                query = torch.zeros(ids.shape, dtype=torch.bool)
                query[layout.packed_row[:, None].expand_as(cols)[cmask], cols[cmask]] = True
                mb.update(query_rows=query, region_mask=region, image_mask=ids == hf.tokens.image)
            out.append(mb)
        return out

    def rows(self, index: slice) -> ScoringBatch:
        """The rows `index` (a slice), e.g. one data-parallel rank's share."""
        return replace(self, sequences=self.sequences[index], attention_mask=self.attention_mask[index],
                       completion_mask=self.completion_mask[index], pixel_values=self.pixel_values[index],
                       image_grid_thw=self.image_grid_thw[index], region_mask=self.region_mask[index])


def distinct_images(pixel_values: list[torch.Tensor], image_grid_thw: list[torch.Tensor]):
    """Rows' images as the vision tower takes them, each distinct pixel tensor once: (pixel_values, grids
    [n_distinct, 3], order: the distinct images' indices in row order, one per image slot; None when no row
    repeats another's tensor). (None, None, None) without images. Sameness is identity: rows built from one
    prompt share its tensor (ScoringBatch.from_rollout)."""
    start: dict[int, int] = {}   # id(pixel tensor) -> index of its first image among the distinct ones
    pix, thw, order, n_distinct = [], [], [], 0
    for p, g in zip(pixel_values, image_grid_thw):
        if p is None or not p.numel():
            continue
        if id(p) not in start:
            start[id(p)] = n_distinct
            n_distinct += len(g)
            pix.append(p)
            thw.append(g)
        order.extend(range(start[id(p)], start[id(p)] + len(g)))
    if not pix:
        return None, None, None
    grids = torch.cat(thw)
    index = torch.tensor(order, dtype=torch.long)
    return torch.cat(pix), grids, (None if len(order) == len(grids) else index)


def images_per_prompt(inputs: dict, hf) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A processor batch's pixel_values / image_grid_thw split by prompt row (rows without images get empty
    tensors): row b owns the next images in order until they fill its <|image_pad|> tokens."""
    ids = inputs["input_ids"]
    thw = inputs.get("image_grid_thw")
    pixels = inputs.get("pixel_values")
    if thw is None or pixels is None:
        return [torch.zeros(0)] * ids.shape[0], [torch.zeros(0, 3, dtype=torch.long)] * ids.shape[0]
    patches = thw.prod(-1).tolist()
    tokens = tokens_per_image(thw, hf.vision.spatial_merge_size)
    pix_rows, thw_rows, image, patch = [], [], 0, 0
    for b, need in enumerate((ids == hf.tokens.image).sum(1).tolist()):
        first, first_patch = image, patch
        while need > 0 and image < len(tokens):
            need -= tokens[image]
            patch += patches[image]
            image += 1
        if need != 0:
            raise ValueError(f"prompt row {b}: its <|image_pad|> tokens do not match the images' grid sizes "
                             f"(image_grid_thw {thw.tolist()})")
        pix_rows.append(pixels[first_patch:patch])
        thw_rows.append(thw[first:image])
    if image != len(tokens):
        raise ValueError(f"{len(tokens)} images for {image} image slots in the prompts")
    return pix_rows, thw_rows
