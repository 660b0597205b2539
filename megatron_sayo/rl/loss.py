"""GRPO loss (docs/spec.md §5): PPO clipped ratio + beta * k3 KL, token-level mean over the global batch.

Each rank sums its valid tokens' losses and divides by the valid-token count of the whole global batch
(all micro-batches, all data-parallel ranks: `global_token_count`). Summing the ranks' gradients then
gives the gradient of the global token mean. megatron's DDP *averages* gradients over DP by default, so
the caller either scales this loss by the DP size or configures DDP to sum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sayo.config import LossConfig
from megatron_sayo.distributed.groups import resolve_group

_L = LossConfig


def global_token_count(mask: torch.Tensor, dp_group="default") -> torch.Tensor:
    """Number of valid tokens in `mask` summed over the DP group (int64 scalar tensor)."""
    group = resolve_group(dp_group, "dp")
    count = mask.bool().sum().to(torch.int64).reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    return count[0]


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = _L.clip_eps,
              kl_beta: float = _L.kl_beta, global_token_count: torch.Tensor | float = 1.0):
    """(loss, metrics) for log-probs [B, T], advantages [B], mask [B, T]; loss = sum over valid / global count.

    Metrics are detached. pg_loss, kl, clip_fraction, ratio_mean are local sums over the same global count
    (all-reduce SUM over DP gives the global mean); ratio_min/ratio_max are local (reduce with MIN/MAX);
    tokens is the local valid count; a count of 0 is read as 1. clip_fraction counts tokens where the clipped branch is taken.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)  # padding may hold anything; keep it out of exp() and the grads
    old_logp = torch.where(mask, old_logp, zero)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_beta != 0:
        kl = k3_kl(torch.where(mask, ref_logp, zero), logp)
        per_token = pg + kl_beta * kl
    count = torch.as_tensor(global_token_count, dtype=logp.dtype, device=logp.device).clamp(min=1)
    loss = torch.where(mask, per_token, zero).sum() / count

    with torch.no_grad():
        def masked_sum(x):
            return torch.where(mask, x, zero).sum() / count

        taken = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + clip_eps) & (adv > 0))
        metrics = {
            "pg_loss": masked_sum(pg), "kl": masked_sum(kl), "clip_fraction": masked_sum(taken.to(logp.dtype)),
            "ratio_mean": masked_sum(ratio),
            "ratio_min": torch.where(mask, ratio, torch.full_like(ratio, float("inf"))).amin(),
            "ratio_max": torch.where(mask, ratio, torch.full_like(ratio, float("-inf"))).amax(),
            "tokens": mask.sum(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
