"""The GRPO update's gradients for fixed rollouts are the same at TP=1, TP=2, PP=2 and DP=2.

The loss is a token-level mean over the global batch: DP ranks hold disjoint rows, megatron sums their
gradients and divides by the global token count. Reference: the TP=1 single-process gradients.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.testing.fixed_rollout import fixed_rollout, rollout_batch, update_config

LAYOUTS = {"tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2)}


def _rank_grads(hf_dir, tp, pp, data):
    from megatron.core import parallel_state

    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.loss import grpo_token_loss
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.trainer import build_policy
    from megatron_sayo.rl.update import accumulate_gradients

    runtime.init_distributed(tp, pp)
    cfg = update_config(hf_dir, tp, pp)
    model = build_policy(cfg, hf_dir)
    ddp, optimizer, _ = wrap_for_training(model, cfg.optim, cfg.train.steps)
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = slice(r * 4 // dp, (r + 1) * 4 // dp)
    loss = grpo_token_loss(data["old_logp"][mine], data["ref_logp"][mine], data["advantages"][mine], cfg.loss)
    accumulate_gradients(ddp, optimizer, rollout_batch(data, mine), cfg.train.micro_batch, cfg.rollout.temperature,
                         loss)
    grads = {model.global_param_name(n): p.main_grad.clone() for n, p in model.named_parameters()}
    return parallel_state.get_tensor_model_parallel_rank(), r, grads


def _full(results):
    from megatron_sayo.models.qwen25vl.name_map import match_megatron
    from megatron_sayo.models.qwen25vl.weights import unshard

    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for tp_rank, dp_rank, grads in results:
        if dp_rank:
            continue  # DP replicas hold the same (all-reduced) gradients; compared separately below
        for name, g in grads.items():
            by_name.setdefault(name, {})[tp_rank] = g
    return {n: unshard(match_megatron(n)[0], [s[r] for r in sorted(s)]) for n, s in by_name.items()}


@pytest.fixture(scope="module")
def reference(tiny_ckpt, make_image):
    from megatron_sayo.distributed.runtime import spawn_local

    data = fixed_rollout(tiny_ckpt, make_image)
    return data, _full(spawn_local(_rank_grads, 1, str(tiny_ckpt), 1, 1, data))


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_update_gradients_match_single_process(tiny_ckpt, reference, layout):
    from megatron_sayo.distributed.runtime import spawn_local

    tp, pp, world = LAYOUTS[layout]
    data, ref = reference
    results = spawn_local(_rank_grads, world, str(tiny_ckpt), tp, pp, data)
    ours = _full(results)
    assert set(ours) == set(ref)
    nonzero = [n for n, g in ref.items() if g.abs().max() > 0]
    assert len(nonzero) > 0.9 * len(ref), "most parameters must receive gradient"
    for name, g in ref.items():
        err = (ours[name] - g).abs().max().item() / (g.abs().max().item() or 1.0)
        assert err <= 1e-4, f"{layout} {name}: relative gradient error {err:.2e}"
    if layout == "dp2":
        a, b = results[0][2], results[1][2]
        assert all(torch.equal(a[n], b[n]) for n in a), "DP replicas must hold identical gradients"
