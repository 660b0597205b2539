"""Group-normalised GRPO advantages, by explicit group id, also when a group spans data-parallel ranks.

A_i = (r_i - mean_g) / (std_g + eps), std_g the unbiased sample std (divide by n_g - 1), as TRL's
`torch.std`. A group of one completion has std 0 by definition here, so its advantage is 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sayo.config import LossConfig
from megatron_sayo.distributed.groups import resolve_group

_EPS = LossConfig.advantage_eps


def group_centred(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values minus their group's mean [N], each group's unbiased sample std, indexed like values [N]), float64."""
    r = values.double()
    _, index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, index, r) / count
    centred = r - mean[index]
    sq = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, index, centred * centred)
    return centred, torch.sqrt(sq / (count - 1).clamp(min=1))[index]


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """(r - mean of its group) / (sample std of its group + eps) for rewards [N], group_ids [N]."""
    centred, std = group_centred(rewards, group_ids)
    return (centred / (std + eps)).to(rewards.dtype)


def _all_gather_varlen(local: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's 1-D `local` (lengths may differ), in rank order."""
    world = dist.get_world_size(group)
    n = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[:local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [p[:int(c.item())] for p, c in zip(parts, counts)]


def distributed_group_advantages(local_rewards: torch.Tensor, local_group_ids: torch.Tensor, dp_group="default",
                                 eps: float = _EPS) -> torch.Tensor:
    """Advantages of this rank's completions, groups pooled over all DP ranks (group ids must be global).

    Only the small reward and group-id vectors are all-gathered; counts may differ per rank.
    """
    group = resolve_group(dp_group, "dp")
    if group is None or dist.get_world_size(group) == 1:
        return group_advantages(local_rewards, local_group_ids, eps)
    rewards = _all_gather_varlen(local_rewards.double().flatten(), group)
    ids = _all_gather_varlen(local_group_ids.long().flatten(), group)
    offset = sum(r.numel() for r in rewards[:dist.get_rank(group)])
    adv = group_advantages(torch.cat(rewards), torch.cat(ids), eps)
    return adv[offset:offset + local_rewards.numel()].to(local_rewards.dtype).view_as(local_rewards)
