"""DAPO's dynamic sampling (rollout.dynamic_sampling, docs/spec.md §5): a group whose rewards are all equal has
zero advantages and teaches nothing, so it is dropped and more prompts are drawn until the step holds its
train.global_batch groups with a reward spread, at most rollout.dynamic_sampling_max_batches prompt batches.

Each data-parallel rank fills its own share (global_batch / dp groups) from the prompts it draws, so no data
moves between ranks; the ranks stay in lockstep because every one of them draws the same number of batches:
after each batch the smallest count of kept groups over DP is all-reduced, and a rank whose share is full
skips generating (but still takes its prompts from the stream) until every rank is full or the cap is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.rl.batch import ScoringBatch


def group_has_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [N / G]: groups of `group_size` consecutive rows whose rewards are not all equal (std > 0)."""
    r = rewards.double().view(-1, group_size)
    return r.amax(1) != r.amin(1)


def choose_groups(signal: list[list[bool]], need: int) -> tuple[list[tuple[int, int]], int]:
    """((batch, group) pairs of the first `need` groups with signal in draw order, topped up with the first flat
    groups drawn when fewer have signal; how many flat groups were used to top up)."""
    drawn = [(b, g) for b, flags in enumerate(signal) for g in range(len(flags))]
    good = [bg for bg in drawn if signal[bg[0]][bg[1]]][:need]
    fill = [bg for bg in drawn if not signal[bg[0]][bg[1]]][:need - len(good)]
    chosen = sorted(good + fill)
    return chosen, len(fill)


@dataclass
class DrawStats:
    """Per step, summed over DP: prompt batches drawn, flat groups dropped, flat groups kept to fill a short
    share at the cap, completions generated beyond global_batch x G."""

    batches: int
    groups_dropped: int
    groups_filled: int
    extra_rollouts: int

    def metrics(self) -> dict:
        return {"dynamic_batches": self.batches, "dynamic_groups_dropped": self.groups_dropped,
                "dynamic_groups_filled": self.groups_filled, "dynamic_extra_rollouts": self.extra_rollouts}


def draw_until_full(draw: Callable[[int, bool], list[bool] | None], need: int, group_size: int,
                    max_batches: int, dp_group=None) -> tuple[list[tuple[int, int]], DrawStats]:
    """Call draw(batch, generate) for batches 0, 1, ... on every rank; it returns this rank's per-group signal
    flags when `generate` (None otherwise). Stops once every DP rank has `need` groups with signal, or after
    `max_batches`. Returns this rank's chosen (batch, group) pairs (choose_groups) and the DP-summed stats."""
    signal: list[list[bool]] = []
    generated = 0
    for batch in range(max_batches):
        kept = sum(sum(flags) for flags in signal)
        flags = draw(batch, kept < need)
        signal.append(list(flags) if flags is not None else [])
        generated += len(signal[-1])
        kept = torch.tensor([float(sum(sum(f) for f in signal))])
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(kept, op=dist.ReduceOp.MIN, group=dp_group)
        if kept.item() >= need:
            break
    chosen, filled = choose_groups(signal, need)
    flat = sum(len(f) - sum(f) for f in signal)
    counts = torch.tensor([float(len(signal)), float(flat - filled), float(filled),
                           float((generated - need) * group_size)])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        batches = counts[0].clone()
        dist.all_reduce(counts, group=dp_group)
        counts[0] = batches
    return chosen, DrawStats(*(int(c) for c in counts.tolist()))


# ------------------------------------------------------------------------------------------------ merging draws

def _pad_columns(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    """[N, S, ...] with `left` / `right` columns of `value` added."""
    if not left and not right:
        return x
    shape = list(x.shape)
    parts = []
    if left:
        parts.append(torch.full([shape[0], left, *shape[2:]], value, dtype=x.dtype, device=x.device))
    parts.append(x)
    if right:
        parts.append(torch.full([shape[0], right, *shape[2:]], value, dtype=x.dtype, device=x.device))
    return torch.cat(parts, 1)


def merge_batches(parts: list[tuple[ScoringBatch, list[int]]], pad_id: int) -> ScoringBatch:
    """The chosen rows of several scoring batches as one: prompts left-padded to the longest prompt, completions
    right-padded to the longest completion (padding is masked: the rows' values do not change)."""
    P = max(b.prompt_length for b, _ in parts)
    T = max(b.completion_mask.shape[1] for b, _ in parts)
    seqs, attn, cmask, region, pix, thw = [], [], [], [], [], []
    for b, rows in parts:
        idx = torch.as_tensor(rows, dtype=torch.long, device=b.sequences.device)
        left, right = P - b.prompt_length, T - b.completion_mask.shape[1]
        seqs.append(_pad_columns(b.sequences[idx], left, right, pad_id))
        attn.append(_pad_columns(b.attention_mask[idx], left, right, 0))
        cmask.append(_pad_columns(b.completion_mask[idx], 0, right, 0))
        region.append(_pad_columns(b.region_mask[idx], left, right, False))
        pix += [b.pixel_values[r] for r in rows]
        thw += [b.image_grid_thw[r] for r in rows]
    return replace(parts[0][0], sequences=torch.cat(seqs), attention_mask=torch.cat(attn), prompt_length=P,
                   completion_mask=torch.cat(cmask), pixel_values=pix, image_grid_thw=thw,
                   region_mask=torch.cat(region))


def merge_scores(parts: list[tuple[CompletionScores, list[int]]]) -> CompletionScores:
    """The chosen rows of several CompletionScores as one, right-padded to the widest (key_weights dropped)."""
    T = max(s.mask.shape[1] for s, _ in parts)

    def join(name):
        values = [getattr(s, name) for s, _ in parts]
        if values[0] is None:
            return None
        return torch.cat([_pad_columns(v[torch.as_tensor(rows, dtype=torch.long, device=v.device)], 0,
                                       T - v.shape[1], 0) for v, (_, rows) in zip(values, parts)])
    return CompletionScores(logprobs=join("logprobs"), entropy=join("entropy"), region_mass=join("region_mass"),
                            image_mass=join("image_mass"), mask=join("mask"))


def group_rows(groups: list[int], group_size: int) -> list[int]:
    """Row indices of the given groups (rows of a group are consecutive)."""
    return [g * group_size + j for g in groups for j in range(group_size)]
