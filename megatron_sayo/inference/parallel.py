"""Generation's parallel plumbing: group sizes, which stage samples, the PP broadcast of what it drew, and
sequence parallelism switched off for decode.

The last pipeline stage is the sampler: its TP ranks hold the same gathered logits and draw the same tokens with
the same seeded generator (no TP broadcast, as Megatron-LM's text generation does); one PP broadcast from it
gives every stage what it needs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def group_size(group) -> int:
    """World size of a process group; 1 without torch.distributed or a group."""
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def is_sampler() -> bool:
    """The last pipeline stage: its TP ranks hold the same gathered logits and draw the same tokens."""
    return parallel_state.is_pipeline_last_stage()


def share_from_sampler(values: torch.Tensor) -> torch.Tensor:
    """`values` as filled on the last stage, on every stage (PP broadcast, in place; its TP ranks filled it alike)."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if group_size(pp_group) > 1:
        dist.broadcast(values, parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return values


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
