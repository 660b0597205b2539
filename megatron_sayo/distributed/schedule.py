"""Run a model over microbatches with megatron's pipeline schedules (1F1B under PP, plain loop without).

Each microbatch is a dict: `inputs` (kwargs of the model's forward, the same on every stage) plus
whatever the loss or collect function needs. Forward-only calls return, on the last pipeline stage,
one `collect(output, microbatch)` result per microbatch (an empty list on other stages).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func


def _forward_step(data_iterator, model, *, loss_fn=None, collect=None):
    microbatch = next(data_iterator)
    output = model(**microbatch["inputs"])

    def finish(output_tensor, non_loss_data=False):
        if non_loss_data:
            return collect(output_tensor, microbatch)
        return loss_fn(output_tensor, microbatch)

    return output, finish


def run_forward(model, microbatches: list[dict], collect: Callable) -> list:
    """Forward-only pass (no grad) over `microbatches`; last stage returns collect(output, mb) per mb."""
    seq, mbs = _shape(microbatches)
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, collect=collect), data_iterator=iter(microbatches),
            model=[model], num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=mbs,
            forward_only=True, collect_non_loss_data=True)


def run_forward_backward(model, microbatches: list[dict], loss_fn: Callable) -> list:
    """Forward and backward over `microbatches`, gradients accumulated in the model.

    `loss_fn(output, mb)` returns (loss_sum, num_tokens, reported_dict) on the last stage: megatron
    divides nothing when config.calculate_per_token_loss is set, which the caller controls.
    """
    seq, mbs = _shape(microbatches)
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn=loss_fn), data_iterator=iter(microbatches),
        model=[model], num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=mbs,
        forward_only=False)


def _shape(microbatches: list[dict]) -> tuple[int, int]:
    ids = microbatches[0]["inputs"]["input_ids"]
    return ids.shape[1], ids.shape[0]
