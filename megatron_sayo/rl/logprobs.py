"""Per-token log-probs and entropies from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds a contiguous vocab shard `logits[..., V/tp]` (rank r owns ids
[r*V/tp, (r+1)*V/tp)). Only per-token scalars cross ranks: the max, the sum of exps, the target logit
and the entropy term, each one all-reduce over the TP group. Leading dims are free: megatron's [S, B, V/tp]
and [B, S, V/tp] both work, with `targets` of the same leading shape. Logits are divided by `temperature`
(the distribution tokens were sampled from). Ids >= `vocab_size` (TP padding) are excluded.
Computation runs in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sayo.distributed.groups import resolve_group


def _resolve(group):
    return resolve_group(group, "tp")


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _scaled_shard(logits: torch.Tensor, temperature: float, vocab_size: int | None, group):
    """(z = logits/T with padded ids at -inf, first global id of this shard, valid-id mask or None)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    compute = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(compute) / temperature
    shard = logits.shape[-1]
    rank = dist.get_rank(group) if group is not None else 0
    start = rank * shard
    valid = None
    if vocab_size is not None and start + shard > vocab_size:
        valid = torch.arange(start, start + shard, device=logits.device) < vocab_size
        z = z.masked_fill(~valid, float("-inf"))
    return z, start, valid


def _logsumexp(z: torch.Tensor, group) -> torch.Tensor:
    """log sum_v exp(z_v) over the full (sharded) vocabulary; z has no grad here."""
    m = _all_reduce(z.amax(dim=-1), dist.ReduceOp.MAX, group)
    s = _all_reduce(torch.exp(z - m.unsqueeze(-1)).sum(dim=-1), dist.ReduceOp.SUM, group)
    return m + torch.log(s)


def _target_logit(z: torch.Tensor, targets: torch.Tensor, start: int, group) -> torch.Tensor:
    """z[..., target] picked on the rank that owns the id (0 elsewhere), then summed over ranks."""
    local = targets - start
    owned = (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return _all_reduce(torch.where(owned, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)


class _VocabParallelLogProb(torch.autograd.Function):
    """log softmax(logits/T)[target]; backward is local: (onehot - p) / T times the upstream grad."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, vocab_size, group):
        with torch.no_grad():
            z, start, _ = _scaled_shard(logits, temperature, vocab_size, group)
            lse = _logsumexp(z, group)
            logp = _target_logit(z, targets, start, group) - lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.args = (temperature, vocab_size, group, start)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        temperature, vocab_size, group, start = ctx.args
        z, _, _ = _scaled_shard(logits, temperature, vocab_size, group)
        grad = -torch.exp(z - lse.unsqueeze(-1))  # -p; padded ids give exp(-inf) = 0
        local = targets - start
        owned = (local >= 0) & (local < z.shape[-1])
        index = local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)
        grad.scatter_add_(-1, index, owned.to(grad.dtype).unsqueeze(-1))
        grad *= (grad_logp.to(grad.dtype) / temperature).unsqueeze(-1)
        return grad.to(logits.dtype), None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                            vocab_size: int | None = None, group="default") -> torch.Tensor:
    """log p(targets) under softmax(logits / T) over the sharded vocab; differentiable wrt logits.

    `group="default"` means megatron's TP group (or none when parallel_state is not initialised).
    Gradients are per shard: each TP rank gets d logp / d (its logits), as megatron's vocab-parallel CE.
    """
    group = _resolve(group)
    return _VocabParallelLogProb.apply(logits, targets.long(), float(temperature), vocab_size, group)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, *, temperature: float = 1.0, vocab_size: int | None = None,
                           group="default") -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, H = lse - sum_v p_v z_v; no gradient."""
    group = _resolve(group)
    z, _, _ = _scaled_shard(logits, temperature, vocab_size, group)
    lse = _logsumexp(z, group)
    return lse - _expected_logit(z, lse, group)


def _expected_logit(z: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """sum_v p_v z_v over the sharded vocab (padded ids contribute 0, not 0 * -inf)."""
    p = torch.exp(z - lse.unsqueeze(-1))
    pz = torch.where(p > 0, p * z, torch.zeros_like(p)).sum(dim=-1)
    return _all_reduce(pz, dist.ReduceOp.SUM, group)


@torch.no_grad()
def vocab_parallel_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                                        vocab_size: int | None = None, group="default"):
    """(log p(targets), entropy) sharing one log-sum-exp; no gradient (the scoring pass)."""
    group = _resolve(group)
    z, start, _ = _scaled_shard(logits, temperature, vocab_size, group)
    lse = _logsumexp(z, group)
    logp = _target_logit(z, targets.long(), start, group) - lse
    return logp, lse - _expected_logit(z, lse, group)
