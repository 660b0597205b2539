"""The policy's training wrappers: megatron DDP, megatron's Adam (distributed when optim.distributed_optimizer) and a
constant-LR scheduler with linear warm-up, wired into the model config the pipeline schedules read."""

from __future__ import annotations

from megatron_sayo.config import OptimConfig
from megatron_sayo.distributed import runtime


def wrap_for_training(model, o: OptimConfig, total_steps: int):
    """(ddp, optimizer, scheduler) for `model` under the optimizer settings `o` for `total_steps` updates."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model.config
    distributed_opt = o.distributed_optimizer
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_opt), model)
    with runtime.megatron_tensor_types():   # on CPU megatron's optimizers accept CPU parameters
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.grad_clip, bf16=config.bf16, fp16=config.fp16,
            params_dtype=config.params_dtype, use_distributed_optimizer=distributed_opt), [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(total_steps, o.warmup_steps + 1),
        lr_decay_style="constant", start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=1,
        wd_incr_style="constant")
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, scheduler
