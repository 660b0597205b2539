"""Per-token losses of the update, in megatron's per-token-loss contract (docs/spec.md §5).

Every loss here returns the SUM of its per-token terms over this rank's valid tokens, and the caller hands
megatron that sum with the token count (the model is built with `calculate_per_token_loss`): DDP then sums
gradients over data-parallel ranks and `finalize_model_grads` divides them by the token count of the whole
global batch, i.e. the gradient of a token-level mean over the global batch. Metrics are sums over the same
tokens (divide by the all-reduced token count to report them).
"""

from __future__ import annotations

import torch

from megatron_sayo.config import LossConfig

_L = LossConfig


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = _L.clip_eps,
              kl_beta: float = _L.kl_beta, clip_eps_high: float | None = _L.clip_eps_high):
    """(loss, metrics): PPO clipped ratio + kl_beta * k3 KL summed over valid tokens, for log-probs [B, T],
    advantages [B], mask [B, T]. The ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's clip-higher;
    clip_eps_high None: clip_eps, the symmetric PPO clip).

    Metrics are detached: pg_loss, kl, clip_fraction (tokens where the clipped branch is taken), ratio_mean are
    sums over valid tokens; ratio_min/ratio_max are local extremes; tokens is the valid count.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)  # padding may hold anything; keep it out of exp() and the grads
    old_logp = torch.where(mask, old_logp, zero)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + high)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_beta != 0:
        kl = k3_kl(torch.where(mask, ref_logp, zero), logp)
        per_token = pg + kl_beta * kl
    loss = torch.where(mask, per_token, zero).sum()

    with torch.no_grad():
        def masked_sum(x):
            return torch.where(mask, x, zero).sum()

        taken = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
        metrics = {
            "pg_loss": masked_sum(pg), "kl": masked_sum(kl), "clip_fraction": masked_sum(taken.to(logp.dtype)),
            "ratio_mean": masked_sum(ratio),
            "ratio_min": torch.where(mask, ratio, torch.full_like(ratio, float("inf"))).amin(),
            "ratio_max": torch.where(mask, ratio, torch.full_like(ratio, float("-inf"))).amax(),
            "tokens": mask.sum(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def nll_loss(logp: torch.Tensor, mask: torch.Tensor):
    """(loss, metrics): next-token negative log-likelihood summed over valid tokens (the supervised warm-up)."""
    mask = mask.bool()
    nll = -torch.where(mask, logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum()
    return nll, {"nll": nll.detach(), "tokens": mask.sum()}


def grpo_token_loss(old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                    cfg: LossConfig):
    """grpo_loss bound to a batch's old/ref log-probs [N, T] and advantages [N]: (logp, rows, mask) -> (loss, m)."""
    def token_loss(logp: torch.Tensor, rows: slice, mask: torch.Tensor):
        return grpo_loss(logp, old_logp[rows], None if ref_logp is None else ref_logp[rows], advantages[rows],
                         mask, cfg.clip_eps, cfg.kl_beta, cfg.clip_eps_high)
    return token_loss
