"""train.prompt_sharing (issue 30): the packed [prompt | c_1 | ... | c_k] passes give the unshared rows' per-token
log-probs, entropies, region/image masses (both reward.attention_row forms), reference log-probs, loss and every
parameter's gradient, within 1e-5 relative in float32 at TP1, TP2, PP2 and TP2xPP2 (also with
model.region_mass_kernel 'indicator'), and GRPO steps with capture on and off. Reference: the unshared path (each
row [prompt | c_i] on its own, causal + padding mask) on the same weights. The batch (testing/shared_prompt_batch)
has a two-image prompt, a text-only prompt and a one-image prompt with region keys, left-padded, G = 3/2/3,
completions of 1..6 tokens; micro-batches of 3 and 4 rows cut groups (the prompt then goes once per piece)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sayo.models.qwen25vl import shared_prompt_attention
from megatron_sayo.rl import shared_prompt as sp

REL_TOL = 1e-5
ABS_FLOOR = 1e-7   # float32 unit roundoff of the O(1) rewards and losses a logged metric is computed from
ROOT = Path(__file__).resolve().parents[2]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (absolute when want is all 0)."""
    return float((got.double() - want.double()).abs().max()) / (float(want.double().abs().max()) or 1.0)


# ------------------------------------------------------------------------------------- the pure index math

def test_mask_hand_case():
    """Segments: left pad, 2 prompt tokens, completion 1 (2 tokens), completion 2 (2 tokens), right pad."""
    seg = torch.tensor([[-1, 0, 0, 1, 1, 2, 2, -1]])
    allowed = shared_prompt_attention.shared_allowed(seg)[0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0, 0, 0],
                       [0, 1, 0, 0, 0, 0, 0, 0],
                       [0, 1, 1, 0, 0, 0, 0, 0],
                       [0, 1, 1, 1, 0, 0, 0, 0],
                       [0, 1, 1, 1, 1, 0, 0, 0],
                       [0, 1, 1, 0, 0, 1, 0, 0],     # completion 2 sees the prompt, never completion 1
                       [0, 1, 1, 0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0, 0, 1]]


def test_token_columns_and_pieces_hand_case():
    own, logits = sp.token_columns([2, 1, 3], prompt_length=4, width=3)
    assert own.tolist() == [[4, 5, 3], [6, 3, 3], [7, 8, 9]]
    assert logits.tolist() == [[3, 4, 3], [3, 3, 3], [3, 7, 8]]      # every first token from column P - 1
    groups = [0, 0, 0, 1, 1, 2, 2, 2]
    assert [sp.pieces(groups, range(s, min(s + 3, 8))) for s in (0, 3, 6)] == [[[0, 1, 2]], [[3, 4], [5]], [[6, 7]]]
    with pytest.raises(ValueError, match="prefix"):
        sp.completion_lengths(torch.tensor([[1, 0, 1]]))


def test_packed_positions_and_tokens_equal_the_unshared_rows(tiny_ckpt, make_image):
    """Every completion token's packed id and M-RoPE position equal its unshared row's (get_rope_index of the
    whole row); prompt columns equal the row's; groups are found (3 prompts)."""
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
    from megatron_sayo.models.qwen25vl.rope import get_rope_index
    from megatron_sayo.testing.shared_prompt_batch import GROUPS, scoring_batch, shared_prompt_rollout

    hf = load_hf_config(tiny_ckpt)
    data = shared_prompt_rollout(tiny_ckpt, make_image)
    batch = scoring_batch(data)
    P = batch.prompt_length
    thw = torch.cat([t for t in batch.image_grid_thw if t.numel()])
    want, _ = get_rope_index(batch.sequences, thw, batch.attention_mask, image_token_id=hf.tokens.image,
                             vision_start_token_id=hf.tokens.vision_start,
                             spatial_merge_size=hf.vision.spatial_merge_size)
    groups = sp.prompt_groups(batch.sequences, batch.attention_mask, P, batch.region_mask, batch.pixel_values,
                              batch.image_grid_thw)
    assert groups == [g for g, n in enumerate(GROUPS) for _ in range(n)]
    for size in (3, 8):
        for mb in batch.microbatches(hf, size, with_probe=False, shared=True):
            lay, ids, pos = mb["layout"], mb["inputs"]["input_ids"], mb["inputs"]["position_ids"]
            rows = range(mb["rows"].start, min(mb["rows"].stop, len(groups)))
            cmask = batch.completion_mask[mb["rows"]].bool()
            got_pos = lay.gather(pos.permute(1, 2, 0), "query")            # [n, T, 3]
            assert torch.equal(lay.gather(ids, "query")[cmask], batch.sequences[mb["rows"], P:][cmask])
            assert torch.equal(got_pos[cmask], want[:, mb["rows"], P:].permute(1, 2, 0)[cmask])
            for i, n in enumerate(rows):
                b = int(lay.packed_row[i])
                assert torch.equal(ids[b, :P], batch.sequences[n, :P])
                assert torch.equal(pos[:, b, :P], want[:, n, :P])
            assert ids.shape[0] == max(len(sp.pieces(groups, range(s, min(s + size, 8)))) for s in range(0, 8, size))


# ------------------------------------------------------------------------------------- the passes, per layout

def _compare(hf_dir, tp, pp, data, micro_batches, variants, leaky=False):
    """On one rank: for each (variant, micro_batch), the largest relative error of shared vs unshared scores,
    reference log-probs, loss metrics and gradients. leaky: a mask that lets completions see each other."""
    from megatron.core import parallel_state

    from megatron_sayo.distributed import runtime
    from megatron_sayo.models.lora import attach_lora, load_full_adapters
    from megatron_sayo.rl.loss import grpo_token_loss
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.scoring import reference_logprobs, score_policy
    from megatron_sayo.rl.trainer import build_policy, freeze_vision_tower
    from megatron_sayo.rl.update import accumulate_gradients
    from megatron_sayo.testing.fixed_rollout import random_adapters, update_config
    from megatron_sayo.testing.shared_prompt_batch import scoring_batch

    if leaky:
        def leaky_mask(seg):          # causal over every real key: completions see each other
            causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril()[None]
            return (causal & (seg[:, None, :] >= 0)) | torch.eye(seg.shape[1], dtype=torch.bool)
        shared_prompt_attention.shared_allowed = leaky_mask
    runtime.init_distributed(tp, pp)
    last = parallel_state.is_pipeline_last_stage()
    batch = scoring_batch(data)
    errors = {}
    for variant in variants:
        if variant == "indicator":   # model.region_mass_kernel: indicator (the masses from a 0/1-valued attention)
            cfg = update_config(hf_dir, tp, pp, model={"hf_path": str(hf_dir), "params_dtype": "float32",
                                                       "region_mass_kernel": "indicator"})
            model = build_policy(cfg, hf_dir)
            errors.update({(variant, mbs): _compare_indicator_masses(model, batch, mbs, last)
                           for mbs in micro_batches})
            continue
        cfg = update_config(hf_dir, tp, pp)
        model = build_policy(cfg, hf_dir)
        if variant == "lora":   # B != 0 (random_adapters), else every A gradient is 0 and proves nothing
            attach_lora(model, model.hf.text, rank=4, alpha=8.0)
            load_full_adapters(model, random_adapters(model.hf.text, 4, seed=3))
        if variant == "frozen":
            freeze_vision_tower(model)
        if variant == "split":   # the mask-free form (the GPU one) on CPU, torch's fused CPU kernel per part
            model.shared_form = "split"
        ddp, optimizer, _ = wrap_for_training(model, cfg.optim, cfg.train.steps)
        loss = grpo_token_loss(data["old_logp"], data["ref_logp"], data["advantages"], cfg.loss)
        for mbs in micro_batches:
            err = {}
            for row in ("token", "decision"):
                a = score_policy(model, batch, mbs, 0.7, attention_row=row)
                s = score_policy(model, batch, mbs, 0.7, attention_row=row, shared=True)
                if last:
                    for k in ("logprobs", "entropy", "region_mass", "image_mass"):
                        err[f"{row}.{k}"] = rel_err(getattr(s, k), getattr(a, k))
            a = reference_logprobs(model, batch, mbs, 0.7)
            s = reference_logprobs(model, batch, mbs, 0.7, shared=True)
            if last:
                err["reference"] = rel_err(s, a)
            ra = accumulate_gradients(ddp, optimizer, batch, mbs, 0.7, loss)
            ga = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            rs = accumulate_gradients(ddp, optimizer, batch, mbs, 0.7, loss, shared=True)
            gs = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            if last:
                for k in ("pg_loss", "kl", "ratio_mean"):
                    err[f"loss.{k}"] = rel_err(torch.stack([r[k] for r in rs]).sum(),
                                               torch.stack([r[k] for r in ra]).sum())
            nonzero = sum(bool(g.abs().max() > 0) for g in ga.values())
            err["grad"] = max(rel_err(gs[n], ga[n]) for n in ga)
            err["grad_nonzero_fraction"] = nonzero / len(ga)
            err["frozen_params"] = sum(not p.requires_grad for p in model.parameters())
            errors[(variant, mbs)] = err
    return parallel_state.get_tensor_model_parallel_rank(), last, errors


def _compare_indicator_masses(model, batch, mbs, last):
    """model.region_mass_kernel 'indicator' (model built with it): shared vs unshared scores of both
    attention_row forms with the indicator kernel, and shared-indicator vs the unshared 'lse' masses; counts the
    indicator calls with and without sharing (0 would mean the path under test never ran)."""
    from megatron_sayo.attention import region_mass
    from megatron_sayo.models.qwen25vl.attention import CoreAttention
    from megatron_sayo.rl.scoring import score_policy

    calls = {"n": 0}
    real = region_mass.indicator_mass_sums

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    def set_kernel(kernel):
        for m in model.modules():
            if isinstance(m, CoreAttention):
                m.mass_kernel = kernel

    err = {}
    region_mass.indicator_mass_sums = counted
    try:
        for row in ("token", "decision"):
            set_kernel("indicator")
            before = calls["n"]
            a = score_policy(model, batch, mbs, 0.7, attention_row=row)
            unshared_calls = calls["n"] - before
            s = score_policy(model, batch, mbs, 0.7, attention_row=row, shared=True)
            err[f"indicator_calls.{row}.unshared"] = unshared_calls
            err[f"indicator_calls.{row}.shared"] = calls["n"] - before - unshared_calls
            set_kernel("lse")
            e = score_policy(model, batch, mbs, 0.7, attention_row=row)
            if last:
                for k in ("logprobs", "entropy", "region_mass", "image_mass"):
                    err[f"{row}.{k}"] = rel_err(getattr(s, k), getattr(a, k))
                for k in ("region_mass", "image_mass"):
                    err[f"{row}.{k}_vs_lse"] = rel_err(getattr(s, k), getattr(e, k))
                    err[f"{row}.{k}_nonzero"] = int((getattr(a, k) != 0).sum())
    finally:
        region_mass.indicator_mass_sums = real
        set_kernel("indicator")
    return err


@pytest.fixture(scope="module")
def data(tiny_ckpt, make_image):
    from megatron_sayo.testing.shared_prompt_batch import shared_prompt_rollout

    return shared_prompt_rollout(tiny_ckpt, make_image)


def _check(results, want_variants):
    seen = set()
    for _, last, errors in results:
        for (variant, mbs), err in errors.items():
            seen.add(variant)
            if variant == "indicator":
                _check_indicator(err, last, mbs)
                continue
            assert err["grad_nonzero_fraction"] > 0.5, (variant, mbs, err)
            if variant == "frozen":
                assert err["frozen_params"] > 0
            for key, value in err.items():
                if key in ("grad_nonzero_fraction", "frozen_params"):
                    continue
                assert value <= REL_TOL, f"{variant} micro_batch={mbs} {key}: relative error {value:.2e}"
        if last:
            assert any("token.logprobs" in e for e in errors.values())
    assert seen == set(want_variants)


def _check_indicator(err, last, mbs):
    for key, value in err.items():
        if key.startswith("indicator_calls"):
            assert value > 0, f"micro_batch={mbs}: the indicator kernel never ran ({key}): {err}"
        elif key.endswith("_nonzero"):
            assert value > 0, f"micro_batch={mbs}: {key} - all masses 0, the comparison proves nothing"
        else:
            assert value <= REL_TOL, f"indicator micro_batch={mbs} {key}: relative error {value:.2e}"
    if last:
        assert "token.region_mass" in err and "decision.image_mass_vs_lse" in err, err


def _tp1_and_leaky(hf_dir, data):
    """One process: the TP1 comparisons, then the same with a leaky mask (patched last: it stays patched)."""
    proper = _compare(hf_dir, 1, 1, data, (3, 8), ("full", "lora", "frozen", "split"))
    return proper, _compare(hf_dir, 1, 1, data, (8,), ("full",), leaky=True)


@pytest.mark.multiproc
def test_shared_equals_unshared_tp1_and_a_leak_fails(tiny_ckpt, data):
    """TP1: the full model, LoRA (adapters only train), the frozen vision tower and the split (mask-free)
    attention; micro-batches of 3 rows (groups
    cut, a piece of 2 + a piece of 1 in one micro-batch) and of 8 (each prompt once). Then a mask that lets a
    completion see the earlier completions: errors far above the tolerance (the comparison can fail)."""
    from megatron_sayo.distributed.runtime import spawn_local

    (proper, (_, _, leaked)), = spawn_local(_tp1_and_leaky, 1, str(tiny_ckpt), data)
    _check([proper], ("full", "lora", "frozen", "split"))
    err = leaked[("full", 8)]
    assert err["token.logprobs"] > 1e-3 and err["reference"] > 1e-3 and err["grad"] > 1e-3, err


def _indicator_and_leaky(hf_dir, data):
    """One process: the indicator-kernel mass comparison, then the same with a leaky mask (patched last)."""
    proper = _compare(hf_dir, 1, 1, data, (3, 8), ("indicator",))
    return proper, _compare(hf_dir, 1, 1, data, (8,), ("indicator",), leaky=True)


@pytest.mark.multiproc
def test_shared_equals_unshared_indicator_mass_kernel(tiny_ckpt, data):
    """model.region_mass_kernel 'indicator' on CPU (the masked shared form hands the probe the segment mask;
    torch's default SDPA runs the 0/1-valued attention): shared vs unshared log-probs, entropies, region and
    image masses of both attention_row forms within 1e-5 relative, the shared indicator masses also vs the
    unshared 'lse' ones; micro-batches of 3 (groups cut) and 8; the indicator kernel ran on both paths. Then
    a mask letting completions see each other moves the masses far above the tolerance."""
    from megatron_sayo.distributed.runtime import spawn_local

    (proper, (_, _, leaked)), = spawn_local(_indicator_and_leaky, 1, str(tiny_ckpt), data)
    _check([proper], ("indicator",))
    err = leaked[("indicator", 8)]
    assert err["token.region_mass"] > 1e-3 and err["token.image_mass"] > 1e-3, err
    assert err["decision.image_mass"] > 1e-3, err


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_shared_equals_unshared_tp2_pp2(tiny_ckpt, data, tp, pp):
    """TP2 (vocab-parallel log-probs, head-split masses), PP2 (1F1B over packed micro-batches of one shape) and
    TP2xPP2 (4 ranks: both at once); micro-batches of 4 rows cut the second group."""
    from megatron_sayo.distributed.runtime import spawn_local

    _check(spawn_local(_compare, tp * pp, str(tiny_ckpt), tp, pp, data, (4,), ("full",)), ("full",))


# ------------------------------------------------------------------------------------- 3 GRPO steps

def _train(tiny_ckpt, train_file, run_dir, sharing: bool, capture: bool, steps: int = 3):
    config = ROOT / "megatron_sayo/configs/tiny.yaml"
    args = [f"model.hf_path={tiny_ckpt}", "model.make_tiny_if_missing=false", f"data.train_file={train_file}",
            "data.eval_file=null", "data.synthetic_n=0", f"run_dir={run_dir}", f"train.steps={steps}",
            "train.global_batch=2", "train.micro_batch=3", "rollout.group_size=3", "rollout.max_new_tokens=6",
            "checkpoint.interval=0", "log.tensorboard=false", "warmup.steps=0", "eval.interval=0",
            "parallel.tp=1", "loss.kl_beta=0.05", f"train.prompt_sharing={str(sharing).lower()}",
            f"rollout.capture_scores={str(capture).lower()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "megatron_sayo.train", "--config", str(config), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("capture,steps", [(False, 3), (True, 2)], ids=["capture_off", "capture_on"])
def test_three_grpo_steps_take_the_unshared_metrics(tiny_ckpt, tmp_path, capture, steps):
    """Steps with a KL term, sharing on vs off: capture off, 3 steps (scoring, reference and update all shared),
    and capture on, 2 steps (the rollout's captured scores; reference and update shared; 2 steps keep the two
    cases near 90 s on a loaded 2-core machine and still sample step 2 from the updated weights): the same
    completions and every logged number within 1e-5 relative (+ ABS_FLOOR)."""
    from megatron_sayo.train import write_synthetic

    write_synthetic(tmp_path / "train.jsonl", 8, seed=0)
    on = _train(tiny_ckpt, tmp_path / "train.jsonl", tmp_path / "on", True, capture, steps)
    off = _train(tiny_ckpt, tmp_path / "train.jsonl", tmp_path / "off", False, capture, steps)
    assert len(on) == len(off) == steps
    bad = []
    for a, b in zip(on, off):
        assert a["sample_completion"] == b["sample_completion"]
        for key, want in b.items():
            if key.startswith(("time_", "tokens_per_s")) or not isinstance(want, (int, float)):
                continue
            # + ABS_FLOOR: spreads (e.g. a group's reward std) of O(1) values keep only their absolute precision
            if not abs(a[key] - want) <= REL_TOL * abs(want) + ABS_FLOOR:
                bad.append((a["step"], key, a[key], want))
    assert not bad, bad
