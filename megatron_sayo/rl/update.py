"""One forward-backward over a ScoringBatch with a per-token loss (rl/loss.py's contract: a sum over this
rank's valid tokens, handed to megatron with the token count), gradients accumulated into the DDP buffers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_sayo.distributed.schedule import run_forward_backward
from megatron_sayo.rl.batch import ScoringBatch
from megatron_sayo.rl.logprobs import vocab_parallel_logprobs
from megatron_sayo.rl.scoring import microbatch_completion_logits

# (log-probs [b, T] with grad, the microbatch's row slice, its completion mask [b, T]) -> (loss sum, metrics)
TokenLoss = Callable[[torch.Tensor, slice, torch.Tensor], tuple[torch.Tensor, dict]]


def accumulate_gradients(ddp, optimizer, batch: ScoringBatch, micro_batch: int, temperature: float,
                         token_loss: TokenLoss, shared: bool = False) -> list[dict]:
    """Zero, then accumulate d(loss)/d(params) over the batch's microbatches into the DDP grads; shared: each
    group's prompt once per microbatch (train.prompt_sharing, rl/shared_prompt.py).

    Returns each microbatch's detached loss metrics (sums) on the last pipeline stage.
    """
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    P = batch.prompt_length
    vocab_size = ddp.module.vocab_size
    reported: list[dict] = []

    def loss_fn(logits, mb):
        rows = mb["rows"]
        z, targets = microbatch_completion_logits(logits, mb, P)
        logp = vocab_parallel_logprobs(z.float(), targets, temperature=temperature, vocab_size=vocab_size)
        mask = batch.completion_mask[rows]
        loss, metrics = token_loss(logp, rows, mask)
        n = mask.sum().to(torch.int)
        reported.append({k: (v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()})
        return loss, n, {"loss": torch.stack([loss.detach(), n.float()])}

    run_forward_backward(ddp, batch.microbatches(ddp.module.hf, micro_batch, with_probe=False, shared=shared), loss_fn)
    return reported
