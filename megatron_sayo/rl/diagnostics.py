"""Can a reward steer GRPO? Within-group statistics: GRPO only sees differences inside a prompt's group, so a
reward with no within-group spread gives no signal, and an update moves TAS only as far as the advantages
correlate with it inside groups."""

from __future__ import annotations

import torch

from megatron_sayo.rl.advantages import group_centred


def mean_group_std(values: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Mean over groups of the unbiased within-group standard deviation of `values` [N]."""
    _, std = group_centred(values, group_ids)
    _, index = torch.unique(group_ids, return_inverse=True)
    per_group = torch.zeros(int(index.max()) + 1, dtype=torch.float64, device=std.device).index_copy_(0, index, std)
    return float(per_group.mean())


def within_group_corr(x: torch.Tensor, y: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Pearson correlation of x and y after removing each group's mean (0 when either has no spread)."""
    cx, _ = group_centred(x, group_ids)
    cy, _ = group_centred(y, group_ids)
    denom = torch.sqrt((cx * cx).sum() * (cy * cy).sum())
    return float((cx * cy).sum() / denom) if float(denom) > 0 else 0.0


def steering_metrics(attention_reward: torch.Tensor, accuracy: torch.Tensor, tas: torch.Tensor,
                     advantages: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """This rank's groups: spread of the attention reward and of accuracy, and how the advantages (whatever the
    reward weights) line up with TAS and with accuracy inside groups."""
    return {"attention_group_std": mean_group_std(attention_reward, group_ids),
            "accuracy_group_std": mean_group_std(accuracy, group_ids),
            "adv_tas_corr": within_group_corr(advantages, tas, group_ids),
            "acc_tas_corr": within_group_corr(accuracy, tas, group_ids)}


def flat_groups(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-6) -> int:
    """Groups whose rewards all lie within `tol` of each other (their advantages are ~0: no signal)."""
    _, index = torch.unique(group_ids, return_inverse=True)
    n = int(index.max()) + 1 if index.numel() else 0
    values = rewards.double()
    hi = torch.full((n,), -float("inf"), dtype=torch.float64, device=values.device)
    lo = torch.full((n,), float("inf"), dtype=torch.float64, device=values.device)
    hi, lo = hi.scatter_reduce(0, index, values, "amax"), lo.scatter_reduce(0, index, values, "amin")
    return int(((hi - lo) <= tol).sum())
