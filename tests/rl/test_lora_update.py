"""The GRPO update with LoRA: adapter gradients at TP=2 and PP=2 equal TP=1's; the base gets none and the
optimizer holds the adapters only. Reference: the TP=1 single-process gradients of the same full adapters."""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
from megatron_sayo.testing.fixed_rollout import fixed_rollout, random_adapters, rollout_batch, update_config

LAYOUTS = {"tp2": (2, 1, 2), "pp2": (1, 2, 2)}
RANK, ALPHA = 4, 8.0


def _rank_grads(hf_dir, tp, pp, data, adapters):
    from megatron.core import parallel_state

    from megatron_sayo.distributed import runtime
    from megatron_sayo.models.lora import attach_lora, load_full_adapters, local_adapters
    from megatron_sayo.rl.loss import grpo_token_loss
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.trainer import build_policy
    from megatron_sayo.rl.update import accumulate_gradients

    runtime.init_distributed(tp, pp)
    cfg = update_config(hf_dir, tp, pp)
    model = build_policy(cfg, hf_dir)
    attach_lora(model, model.hf.text, rank=RANK, alpha=ALPHA)
    load_full_adapters(model, adapters)
    ddp, optimizer, _ = wrap_for_training(model, cfg.optim, cfg.train.steps)
    accumulate_gradients(ddp, optimizer, rollout_batch(data), cfg.train.micro_batch, cfg.rollout.temperature,
                         grpo_token_loss(data["old_logp"], data["ref_logp"], data["advantages"], cfg.loss))
    mine = local_adapters(model)
    base_with_grad = [n for n, p in model.named_parameters() if n not in {k for k in mine}
                      and (p.requires_grad or getattr(p, "main_grad", None) is not None or p.grad is not None)]
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapter_ids = {id(p) for p in model.parameters() if p.requires_grad}
    grads = {model.global_param_name(n): p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return parallel_state.get_tensor_model_parallel_rank(), grads, base_with_grad, opt_params == adapter_ids


def _full(results):
    from megatron_sayo.models.qwen25vl.lora_names import TARGETS, sharded_dim

    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for tp_rank, grads, _, _ in results:
        for name, g in grads.items():
            by_name.setdefault(name, {})[tp_rank] = g
    out = {}
    for name, shards in by_name.items():
        target = next(t for t in TARGETS.values() if f".{t.adapter_name}." in name)
        dim = sharded_dim(target, name[-1])
        parts = [shards[r] for r in sorted(shards)]
        if dim is None:
            assert all(torch.equal(p, parts[0]) for p in parts), f"{name}: replicated gradient differs across TP"
            out[name] = parts[0]
        else:
            out[name] = torch.cat(parts, dim)
    return out


@pytest.fixture(scope="module")
def reference(tiny_ckpt, make_image):
    from megatron_sayo.distributed.runtime import spawn_local

    data, adapters = fixed_rollout(tiny_ckpt, make_image), random_adapters(load_hf_config(tiny_ckpt).text, RANK, 3)
    results = spawn_local(_rank_grads, 1, str(tiny_ckpt), 1, 1, data, adapters)
    return data, adapters, results


@pytest.mark.multiproc
def test_base_frozen_optimizer_holds_adapters_only(reference):
    _, adapters, results = reference
    _, grads, base_with_grad, optimizer_is_adapters = results[0]
    assert base_with_grad == [], f"frozen base parameters got gradients: {base_with_grad[:3]}"
    assert optimizer_is_adapters
    assert set(grads) == set(adapters)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_adapter_gradients_match_single_process(tiny_ckpt, reference, layout):
    from megatron_sayo.distributed.runtime import spawn_local

    tp, pp, world = LAYOUTS[layout]
    data, adapters, ref_results = reference
    ref = _full(ref_results)
    ours = _full(spawn_local(_rank_grads, world, str(tiny_ckpt), tp, pp, data, adapters))
    assert set(ours) == set(ref)
    assert all(g.abs().max() > 0 for g in ref.values()), "every adapter matrix must receive gradient"
    for name, g in ref.items():
        err = (ours[name] - g).abs().max().item() / g.abs().max().item()
        assert err <= 1e-4, f"{layout} {name}: relative gradient error {err:.2e}"
