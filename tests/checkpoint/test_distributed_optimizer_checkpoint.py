"""megatron's distributed optimizer (bf16 parameters, fp32 main weights, DP=2 over gloo, torch's Adam as on CPU)
through a training checkpoint: a fresh optimizer loaded from it holds, slot by slot, the main weights, Adam
moments and step of the optimizer that wrote it, and its next step gives the same parameters as the writer's next
step. Fails on megatron-core 0.16 without runtime._install_distributed_optimizer_fixes: the save fails (the local
layers' float32 norms beside bf16 biases in one group: shards of the wrong size), a fresh optimizer cannot build
the loading template (no step in an empty Adam state), and after a load every parameter shares one step tensor
that Adam increments once per parameter."""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.testing.fixed_rollout import fixed_rollout, rollout_batch, update_config

pytestmark = pytest.mark.slow


def _slots(optimizer) -> dict:
    """Every slot of the inner torch optimizers, by (optimizer, group, position): main weight + Adam state."""
    out = {}
    for i, inner in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for g, group in enumerate(inner.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                state = inner.optimizer.state[p]
                out[(i, g, k)] = {"param": p.detach().clone(), **{n: v.detach().clone() for n, v in state.items()}}
    return out


def _round_trip(hf_dir, data, run_dir):
    from megatron.core import parallel_state

    from megatron_sayo.checkpoint.state import load_training_state, save_training_state
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.loss import grpo_token_loss
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.trainer import build_policy
    from megatron_sayo.rl.update import accumulate_gradients

    runtime.init_distributed(1, 1)
    cfg = update_config(hf_dir, model={"hf_path": hf_dir, "params_dtype": "bfloat16"},
                        optim={"lr": 1e-3, "warmup_steps": 0, "grad_clip": 0.0, "distributed_optimizer": True})
    r = parallel_state.get_data_parallel_rank()
    rows = slice(2 * r, 2 * r + 2)

    def build():
        torch.manual_seed(0)
        policy = build_policy(cfg, hf_dir)
        return (policy, *wrap_for_training(policy, cfg.optim, 10))

    def step(ddp, optimizer, scheduler):
        loss = grpo_token_loss(data["old_logp"][rows], data["ref_logp"][rows], data["advantages"][rows], cfg.loss)
        accumulate_gradients(ddp, optimizer, rollout_batch(data, rows), 1, cfg.rollout.temperature, loss)
        optimizer.step()
        scheduler.step(1)

    writer = build()
    for _ in range(2):
        step(*writer[1:])
    saved = _slots(writer[2])
    save_training_state(run_dir, 2, writer[0], writer[2], writer[3])
    reader = build()
    load_training_state(run_dir, reader[0], reader[2], reader[3])
    loaded = _slots(reader[2])
    step(*writer[1:])
    step(*reader[1:])
    after = [{n: p.detach().clone() for n, p in policy.named_parameters()} for policy in (writer[0], reader[0])]
    return {"saved": saved, "loaded": loaded, "writer_after": after[0], "reader_after": after[1],
            "dtypes": {str(p.dtype) for p in writer[0].parameters()}}


@pytest.mark.multiproc
def test_distributed_optimizer_state_survives_a_checkpoint(tiny_ckpt, make_image, tmp_path):
    from megatron_sayo.distributed.runtime import spawn_local

    data = fixed_rollout(tiny_ckpt, make_image)
    for rank in spawn_local(_round_trip, 2, str(tiny_ckpt), data, str(tmp_path / "run")):
        assert rank["dtypes"] == {"torch.bfloat16", "torch.float32"}, rank["dtypes"]  # the mixed groups
        assert rank["saved"].keys() == rank["loaded"].keys() and rank["saved"]
        for slot, want in rank["saved"].items():
            got = rank["loaded"][slot]
            assert set(got) == set(want) == {"param", "step", "exp_avg", "exp_avg_sq"}, (slot, set(got))
            for name, tensor in want.items():
                assert torch.equal(got[name], tensor), f"slot {slot}: {name} differs after loading"
        assert float(rank["saved"][next(iter(rank["saved"]))]["step"]) == 2
        for name, want in rank["writer_after"].items():
            assert torch.equal(rank["reader_after"][name], want), f"{name}: the next step differs after loading"
