"""Each prompt once per group (train.prompt_sharing, docs/spec.md §3 and §5): the teacher-forced passes run a
group's rows as one packed sequence [prompt | c_1 | ... | c_k] instead of k rows [prompt | c_i].

Packed row layout: columns [0, P) hold the prompt exactly as the unshared rows do (left-padded), then each
completion's real tokens back to back (completion i at columns P + off_i ..), then right padding. Segments:
-1 padding, 0 prompt, i >= 1 completion i. Query q sees key k iff k <= q, k is real, and k is a prompt token or
in q's own completion, so every completion attends to the whole prompt and causally to itself only. Completion
token j sits at M-RoPE position max(prompt positions) + 1 + j on all three channels (text after the prompt, as
in the unshared row). Token j's logits come from the column before it: the prompt's last column (P - 1) for
j = 0, so one position predicts every completion's first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sayo.models.qwen25vl.rope import get_rope_index


def prompt_groups(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                  region_mask: torch.Tensor, pixel_values: list, image_grid_thw: list) -> list[int]:
    """Group index per row: consecutive rows whose prompt (ids, padding, region keys, images) is identical
    share a group. Rows of one rollout prompt hold one pixel tensor, so identity is checked first."""
    P = prompt_length
    groups: list[int] = []
    for n in range(sequences.shape[0]):
        if n and _same_prompt(n - 1, n, sequences, attention_mask, P, region_mask, pixel_values, image_grid_thw):
            groups.append(groups[-1])
        else:
            groups.append(groups[-1] + 1 if groups else 0)
    return groups


def _same_prompt(a, b, ids, mask, P, region, pix, thw) -> bool:
    if not (torch.equal(ids[a, :P], ids[b, :P]) and torch.equal(mask[a, :P], mask[b, :P])
            and torch.equal(region[a, :P], region[b, :P]) and torch.equal(thw[a], thw[b])):
        return False
    return pix[a] is pix[b] or (pix[a].shape == pix[b].shape and torch.equal(pix[a], pix[b]))


def pieces(groups: list[int], rows: range) -> list[list[int]]:
    """`rows` split into runs of one group (a micro-batch's packed rows; a group cut by the micro-batch boundary
    gives one piece on each side, each with the prompt)."""
    out: list[list[int]] = []
    for n in rows:
        if out and groups[out[-1][-1]] == groups[n]:
            out[-1].append(n)
        else:
            out.append([n])
    return out


def completion_lengths(completion_mask: torch.Tensor) -> list[int]:
    """Real tokens per row; the mask must be a prefix (tokens, then padding)."""
    lengths = completion_mask.bool().sum(1)
    prefix = torch.arange(completion_mask.shape[1])[None] < lengths[:, None]
    if not torch.equal(prefix, completion_mask.bool().cpu()):
        raise ValueError("prompt sharing needs each completion mask to be a prefix (tokens, then padding)")
    return lengths.tolist()


def segments_of(prompt_mask: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """long [width] segment ids of one packed row: -1 padding, 0 prompt, i (1-based) completion i."""
    seg = torch.full((width,), -1, dtype=torch.long)
    P = prompt_mask.shape[0]
    seg[:P] = torch.where(prompt_mask.bool().cpu(), 0, -1)
    col = P
    for i, n in enumerate(lengths, start=1):
        seg[col:col + n] = i
        col += n
    return seg


def packed_positions(prompt_positions: torch.Tensor, prompt_mask: torch.Tensor, lengths: list[int],
                     width: int) -> torch.Tensor:
    """long [3, width]: the prompt's M-RoPE positions [3, P] (0 on padding), then completion token j of every
    completion at max(prompt positions) + 1 + j; padding 0."""
    P = prompt_positions.shape[1]
    out = torch.zeros(3, width, dtype=torch.long)
    out[:, :P] = prompt_positions.cpu()
    real = prompt_mask.bool().cpu()
    start = int(prompt_positions[:, real].max()) + 1 if bool(real.any()) else 0
    col = P
    for n in lengths:
        out[:, col:col + n] = torch.arange(start, start + n)
        col += n
    return out


def token_columns(lengths: list[int], prompt_length: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(own, logits) long [k, width]: per completion of one packed row and token j < width, the packed column
    of token j (its attention row) and of the logits that predict it (P - 1 for j = 0). Padded tokens point at
    column P - 1 (read, then masked out)."""
    own = torch.full((len(lengths), width), prompt_length - 1, dtype=torch.long)
    logits = own.clone()
    col = prompt_length
    for i, n in enumerate(lengths):
        own[i, :n] = torch.arange(col, col + n)
        logits[i, 1:n] = own[i, :n - 1]
        col += n
    return own, logits


@dataclass
class SharedLayout:
    """One micro-batch of packed rows: which rows it covers and where their tokens are."""

    packed_row: torch.Tensor    # long [n]: the packed row of each covered batch row
    own_column: torch.Tensor    # long [n, T]: packed column of token j's attention row
    logits_column: torch.Tensor  # long [n, T]: packed column whose logits predict token j
    segments: torch.Tensor      # long [b, S]

    def gather(self, per_position: torch.Tensor, by: str, first_column: int = 0) -> torch.Tensor:
        """[n, T, ...] values of the covered rows' completion tokens from a per-position array [b, S', ...]
        starting at packed column `first_column`; by "query" (own column) or "logits"."""
        cols = (self.own_column if by == "query" else self.logits_column).to(per_position.device) - first_column
        return per_position[self.packed_row.to(per_position.device)[:, None], cols]


def pack(batch, hf, rows: list[list[int]], width: int, n_packed: int):
    """Packed model inputs for the pieces `rows` of `batch` (a ScoringBatch), padded to [n_packed, width]:
    (ids, positions [3, b, S], region keys [b, S], layout)."""
    P, T = batch.prompt_length, batch.completion_mask.shape[1]
    pad = torch.zeros((), dtype=batch.sequences.dtype)
    ids = torch.full((n_packed, width), int(pad), dtype=batch.sequences.dtype)
    positions = torch.zeros(3, n_packed, width, dtype=torch.long)
    segments = torch.full((n_packed, width), -1, dtype=torch.long)
    region = torch.zeros(n_packed, width, dtype=torch.bool)
    packed_row, own, logit_cols = [], [], []
    lengths_all = completion_lengths(batch.completion_mask)
    for b, piece in enumerate(rows):
        first = piece[0]
        lengths = [lengths_all[n] for n in piece]
        prompt_ids, prompt_mask = batch.sequences[first, :P].cpu(), batch.attention_mask[first, :P].cpu()
        vision = (hf.tokens.vision_start, hf.tokens.image)
        for n, L in zip(piece, lengths):
            if torch.isin(batch.sequences[n, P:P + L].cpu(), torch.tensor(vision)).any():
                raise ValueError(f"row {n}: prompt sharing places completions as text; this one holds vision tokens")
        ids[b, :P] = prompt_ids
        col = P
        for n, L in zip(piece, lengths):
            ids[b, col:col + L] = batch.sequences[n, P:P + L].cpu()
            col += L
        thw = batch.image_grid_thw[first]
        pos, _ = get_rope_index(prompt_ids[None], thw if thw.numel() else None, prompt_mask[None],
                                image_token_id=hf.tokens.image, vision_start_token_id=hf.tokens.vision_start,
                                spatial_merge_size=hf.vision.spatial_merge_size)
        positions[:, b] = packed_positions(pos[:, 0], prompt_mask, lengths, width)
        segments[b] = segments_of(prompt_mask, lengths, width)
        region[b, :P] = batch.region_mask[first, :P].cpu()
        o, lg = token_columns(lengths, P, T)
        own.append(o)
        logit_cols.append(lg)
        packed_row += [b] * len(piece)
    layout = SharedLayout(torch.tensor(packed_row), torch.cat(own), torch.cat(logit_cols), segments)
    return ids, positions, region, layout


def packed_width(batch, rows: list[list[int]]) -> int:
    """Columns the pieces need: the prompt, then every completion's real tokens."""
    lengths = completion_lengths(batch.completion_mask)
    return batch.prompt_length + max(sum(lengths[n] for n in piece) for piece in rows)
