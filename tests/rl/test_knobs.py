"""The GPU examples' non-kernel settings, run on CPU against their plain counterparts (issue 26):
selective and full recompute give the gradients of no recompute, megatron's distributed optimizer over gloo
takes the step of the plain optimizer, bf16 parameters with fp32 main weights stay within bf16's precision of
float32, and the frozen vision tower at PP=2 neither moves nor holds optimizer state while the rest moves.

One fixed GRPO batch (testing/fixed_rollout.py), one update per setting, float32 unless bf16 is the subject.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.testing.fixed_rollout import fixed_rollout, rollout_batch, update_config

pytestmark = pytest.mark.slow


def _update(hf_dir, data, tp, pp, model: dict, optim: dict, rows: slice):
    """Build the policy with `model` settings, take one GRPO update on `rows`; (grads, params after the step)."""
    from megatron_sayo.rl.loss import grpo_token_loss
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.trainer import build_policy, freeze_vision_tower
    from megatron_sayo.rl.update import accumulate_gradients

    cfg = update_config(hf_dir, tp, pp, model={"hf_path": str(hf_dir), "params_dtype": "float32", **model},
                        optim={"lr": LR, "warmup_steps": 0, "grad_clip": 0.0, **optim})
    torch.manual_seed(0)
    policy = build_policy(cfg, hf_dir)
    if cfg.model.freeze_vision:
        freeze_vision_tower(policy)
    ddp, optimizer, _ = wrap_for_training(policy, cfg.optim, cfg.train.steps)
    loss = grpo_token_loss(data["old_logp"][rows], data["ref_logp"][rows], data["advantages"][rows], cfg.loss)
    reported = accumulate_gradients(ddp, optimizer, rollout_batch(data, rows), cfg.train.micro_batch,
                                    cfg.rollout.temperature, loss)
    grads = {n: p.main_grad.detach().clone() for n, p in policy.named_parameters() if hasattr(p, "main_grad")}
    before, after = _main_weights(policy), None
    optimizer.step()
    after = _main_weights(policy)
    in_optimizer = {id(p) for o in getattr(optimizer, "chained_optimizers", [optimizer]) for p in _optimizer_params(o)}
    held = {n: id(p) in in_optimizer for n, p in policy.named_parameters()}
    losses = [float(r["pg_loss"]) for r in reported]
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return {"grads": grads, "before": before, "after": after, "in_optimizer": held, "losses": losses,
            "optimizer": "+".join(type(o).__name__ for o in inner)}


def _main_weights(policy) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer updates: megatron's main_param where it keeps one (bf16 parameters), else
    the parameter itself."""
    out = {}
    for name, p in policy.named_parameters():
        main = getattr(p, "main_param", None)
        out[name] = (main if main is not None and main.numel() == p.numel() else p).detach().float().clone()
    return out


def _optimizer_params(optimizer):
    """The model parameters a megatron optimizer (mixed precision, fp32 or distributed) updates."""
    groups = getattr(optimizer, "model_float16_groups", None) or getattr(optimizer, "model_fp32_groups", None)
    if groups is None:
        groups = [g["params"] for g in optimizer.param_groups]
    return [p for group in groups for p in group]


def _recompute_ranks(hf_dir, data):
    """Per recompute mode: the gradients, and how many recomputed forwards megatron's checkpoint ran."""
    from megatron.core.tensor_parallel.random import CheckpointFunction

    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    backward, calls = CheckpointFunction.backward, []

    def counted(ctx, *args):
        calls.append(1)
        return backward(ctx, *args)

    CheckpointFunction.backward = staticmethod(counted)
    out = {}
    for mode in ("none", "selective", "full"):
        calls.clear()
        out[mode] = (_update(hf_dir, data, 1, 1, {"recompute": mode}, {}, slice(None))["grads"], len(calls))
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / (b.abs().max().item() or 1.0)


@pytest.fixture(scope="module")
def data(tiny_ckpt, make_image):
    return fixed_rollout(tiny_ckpt, make_image)


@pytest.mark.multiproc
def test_selective_and_full_recompute_give_the_gradients_of_none(tiny_ckpt, data):
    from megatron_sayo.distributed.runtime import spawn_local

    runs = spawn_local(_recompute_ranks, 1, str(tiny_ckpt), data)[0]
    grads = {mode: g for mode, (g, _) in runs.items()}
    recomputed = {mode: n for mode, (_, n) in runs.items()}
    assert recomputed["none"] == 0 and recomputed["selective"] > 0 and recomputed["full"] > 0, recomputed
    ref = grads["none"]
    assert sum(g.abs().max() > 0 for g in ref.values()) > 0.9 * len(ref)
    for mode in ("selective", "full"):
        assert set(grads[mode]) == set(ref)
        worst = max((_relative(grads[mode][n], g), n) for n, g in ref.items())
        assert worst[0] <= 1e-6, f"recompute={mode}: {worst[1]} relative gradient error {worst[0]:.2e}"


def _optimizer_ranks(hf_dir, data, distributed: bool):
    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    from megatron.core import parallel_state

    r, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    rows = slice(r * 4 // dp, (r + 1) * 4 // dp)
    out = _update(hf_dir, data, 1, 1, {}, {"distributed_optimizer": distributed}, rows)
    return {"before": out["before"], "after": out["after"], "optimizer": out["optimizer"]}


@pytest.mark.multiproc
def test_distributed_optimizer_over_gloo_takes_the_plain_optimizers_step(tiny_ckpt, data):
    """DP=2: megatron's distributed optimizer (gradients reduce-scattered, each rank updating its shard, the
    parameters all-gathered) leaves every rank with the parameters the plain optimizer gives, within 1e-6."""
    from megatron_sayo.distributed.runtime import spawn_local

    plain = spawn_local(_optimizer_ranks, 2, str(tiny_ckpt), data, False)
    sharded = spawn_local(_optimizer_ranks, 2, str(tiny_ckpt), data, True)
    assert [r["optimizer"] for r in plain + sharded] == ["FP32Optimizer"] * 2 + ["DistributedOptimizer"] * 2, \
        [r["optimizer"] for r in plain + sharded]
    ref = plain[0]
    steps = {n: (ref["after"][n] - ref["before"][n]).abs().max().item() for n in ref["after"]}
    assert sum(step > 1e-4 for step in steps.values()) > 0.9 * len(steps), "the step must move the parameters"
    for rank in sharded:
        worst = max(((rank["after"][n] - want).abs().max().item(), n) for n, want in ref["after"].items())
        assert worst[0] <= 1e-6, f"{worst[1]}: parameters differ by {worst[0]:.2e} after one step"


def _dtype_ranks(hf_dir, data):
    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    return {dtype: _update(hf_dir, data, 1, 1, {"params_dtype": dtype}, {}, slice(None))
            for dtype in ("float32", "bfloat16")}


# bf16 keeps 8 significant bits: unit roundoff 2^-8. Each value in the forward and backward passes through a
# handful of rounded operations per layer (norm, matmul, activation), so results may drift by several unit
# roundoffs; 8 of them bound it, and are still 30x below what skipping a layer's update or gradient would give.
BF16_TOLERANCE = 8 * 2.0**-8
LR = 1e-3   # _update's learning rate: below bf16's spacing (2^-7) at 1.0, so only fp32 main weights keep the step


@pytest.mark.multiproc
def test_bf16_parameters_with_fp32_main_weights_stay_within_bf16_precision(tiny_ckpt, data):
    """Same update in float32 and in bf16 with megatron's fp32 main weights: per-microbatch losses and each
    tensor's gradient within BF16_TOLERANCE (relative); Adam's first step, about +-LR per element, lands in the
    fp32 main weights with the sign of float32's step for nearly every element and the same mean size."""
    from megatron_sayo.distributed.runtime import spawn_local

    runs = spawn_local(_dtype_ranks, 1, str(tiny_ckpt), data)[0]
    f32, b16 = runs["float32"], runs["bfloat16"]
    assert b16["optimizer"] == "Float16OptimizerWithFloat16Params", b16["optimizer"]
    for want, got in zip(f32["losses"], b16["losses"], strict=True):
        assert abs(got - want) <= BF16_TOLERANCE * max(abs(want), 1e-3), (got, want)
    worst = max(((b16["grads"][n] - g).norm().item() / (g.norm().item() or 1.0), n) for n, g in f32["grads"].items())
    assert worst[0] <= BF16_TOLERANCE, f"{worst[1]}: bf16 gradient off by {worst[0]:.3f} (relative)"
    agree = total = 0
    for name, start in f32["before"].items():
        step_f, step_b = f32["after"][name] - start, b16["after"][name] - b16["before"][name]
        agree += (step_f.sign() == step_b.sign()).sum().item()
        total += step_f.numel()
        assert step_b.abs().mean().item() == pytest.approx(step_f.abs().mean().item(), rel=BF16_TOLERANCE), name
    assert agree / total >= 1 - BF16_TOLERANCE, f"update signs agree on {agree / total:.4f} of the elements"


def _frozen_pp2_ranks(hf_dir, data):
    from megatron.core import parallel_state

    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 2)
    out = _update(hf_dir, data, 1, 2, {"freeze_vision": True}, {}, slice(None))
    moved = {n: not torch.equal(out["after"][n], out["before"][n]) for n in out["after"]}
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(), "moved": moved,
            "has_grad": {n: n in out["grads"] for n in moved}, "in_optimizer": out["in_optimizer"]}


@pytest.mark.multiproc
def test_frozen_vision_tower_at_pp2(tiny_ckpt, data):
    """PP=2 with model.freeze_vision: the tower (first stage) gets no gradient buffer, no optimizer state and
    does not move; the decoder layers of both stages move."""
    from megatron_sayo.distributed.runtime import spawn_local

    stages = sorted(spawn_local(_frozen_pp2_ranks, 2, str(tiny_ckpt), data), key=lambda r: r["stage"])
    vision = [n for n in stages[0]["moved"] if n.startswith("vision.")]
    assert vision and not any(n.startswith("vision.") for n in stages[1]["moved"])
    for name in vision:
        assert not (stages[0]["moved"][name] or stages[0]["has_grad"][name] or stages[0]["in_optimizer"][name]), name
    for stage in stages:
        text = [n for n in stage["moved"] if n.startswith("decoder.")]
        assert text and sum(stage["moved"][n] for n in text) > 0.9 * len(text), stage["stage"]
