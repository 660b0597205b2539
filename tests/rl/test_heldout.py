"""Held-out evaluation: per-sample TAS of the evaluator equals a reference built from transformers' eager
last-layer attentions and logits (TP=1 and TP=2), and a short training run writes the eval_* keys to
metrics.jsonl before the first step, every eval.interval steps and after the last.

Tolerance: TAS and attention reward 1e-5 relative (float32 CPU; the masses themselves agree to ~1e-7)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "megatron_sayo/configs/tiny.yaml"
RTOL = 1e-5


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from megatron_sayo.train import write_synthetic

    data = tmp_path_factory.mktemp("heldout")
    write_synthetic(data / "eval.jsonl", 6, seed=3)
    return data / "eval.jsonl"


def _config(ckpt, eval_file, decoding, temperature):
    from megatron_sayo.config import config_from_dict

    return config_from_dict({
        "model": {"hf_path": str(ckpt), "params_dtype": "float32"},
        "data": {"train_file": str(eval_file), "eval_file": str(eval_file), "max_pixels": 50176},
        "rollout": {"max_new_tokens": 10},
        "train": {"micro_batch": 2},
        "eval": {"interval": 1, "num_samples": 6, "batch": 3, "decoding": decoding, "temperature": temperature,
                 "top_p": 0.9}})


def _rank_eval(ckpt, eval_file, tp, decoding, temperature):
    from megatron.core import parallel_state

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.heldout import HeldOutEvaluator

    runtime.init_distributed(tp, 1)
    cfg = _config(ckpt, eval_file, decoding, temperature)
    model = load_model_stage(str(ckpt), tp=tp, params_dtype=torch.float32)
    samples = load_grounded(eval_file)
    evaluator = HeldOutEvaluator(cfg, Processor.from_pretrained(str(ckpt), max_pixels=50176), samples)
    rows = []
    for start in (0, 3):
        rollout, got = evaluator.score_chunk(model, evaluator.samples[start:start + 3])
        for b in range(3):
            n = int(rollout.completion_mask[b].sum())
            rows.append(dict(completion=rollout.completion_ids[b, :n].tolist(),
                             tas=None if got is None else got.tas[b],
                             reward=None if got is None else got.reward_attention[b]))
    summary = evaluator.evaluate(model)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        return rows, summary
    return None


def _eager_tas(ckpt, sample, completion, temperature, ratio=0.3, eps=1e-8):
    """TAS of one completion from transformers' eager attentions: docs/spec.md §3 written out directly."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_sayo.config import DataConfig
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.data.regions import RegionSpec, batch_region_mask
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
    from megatron_sayo.rl.prompts import conversation

    proc = Processor.from_pretrained(str(ckpt), max_pixels=50176)
    inputs = proc([conversation(sample, DataConfig().instruction)])
    hf = load_hf_config(ckpt)
    region = batch_region_mask(inputs["input_ids"], inputs["image_grid_thw"], hf.tokens.image,
                               [RegionSpec(boxes=sample.boxes, orig_size=tuple(sample.image_size))])[0]
    prompt_len = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([completion])], 1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=(ids == model.config.image_token_id).int(), output_attentions=True)
    alpha = out.attentions[-1][0].double()              # [heads, S, S]
    image = (ids[0] == model.config.image_token_id).numpy()
    n = len(completion)
    pos = np.arange(prompt_len, prompt_len + n)          # completion token j: attention row P + j
    a = alpha[:, pos][:, :, torch.from_numpy(np.pad(region.numpy(), (0, n)))].mean(-1).mean(0).numpy()
    v = alpha[:, pos][:, :, torch.from_numpy(image)].mean(-1).mean(0).numpy()
    logits = out.logits[0, pos - 1].double() / temperature   # the distribution token j was drawn from
    entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1).numpy()
    k = max(1, math.floor(ratio * n))
    chosen = np.argsort(-entropy, kind="stable")[:k]
    x = (a[chosen].mean() + eps) / (v[chosen].mean() + eps)
    return x, x * x / (1 + x * x)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,decoding,temperature", [(1, "greedy", 1.0), (2, "sample", 0.7)])
def test_heldout_tas_equals_eager_reference(tiny_ckpt, held_out, tp, decoding, temperature):
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.distributed.runtime import spawn_local

    rows, summary = next(r for r in spawn_local(_rank_eval, tp, tiny_ckpt, held_out, tp, decoding, temperature)
                         if r is not None)
    samples = load_grounded(held_out)
    assert len(rows) == 6 and all(len(r["completion"]) >= 1 for r in rows)
    tas_ref = []
    for sample, row in zip(samples, rows):
        x, reward = _eager_tas(tiny_ckpt, sample, row["completion"], temperature)
        tas_ref.append(x)
        assert row["tas"] == pytest.approx(x, rel=RTOL)
        assert row["reward"] == pytest.approx(reward, rel=RTOL)
    assert len({round(t, 4) for t in tas_ref}) > 1, "the reference must vary across samples"
    assert summary["eval_tas"] == pytest.approx(float(np.mean(tas_ref)), rel=RTOL)
    assert summary["eval_samples"] == 6


@pytest.mark.multiproc
def test_eval_keys_in_metrics_of_a_short_run(tiny_ckpt, held_out, tmp_path):
    from megatron_sayo.distributed.runtime import free_port

    run = tmp_path / "run"
    args = [f"model.hf_path={tiny_ckpt}", "model.make_tiny_if_missing=false", f"data.train_file={held_out}",
            f"data.eval_file={held_out}", "data.synthetic_n=0", f"run_dir={run}", "train.steps=3",
            "train.global_batch=2", "train.micro_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
            "checkpoint.interval=0", "log.tensorboard=false", "warmup.steps=0", "parallel.tp=1",
            "eval.interval=2", "eval.num_samples=4", "reward.weights.accuracy=1.0"]
    done = subprocess.run([sys.executable, "-m", "megatron_sayo.train", "--config", str(CONFIG), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("eval_accuracy", "eval_format", "eval_tas", "eval_reward_attention")
    with_eval = [r["step"] for r in rows if all(k in r for k in keys)]
    assert with_eval == [0, 2, 3]          # before the first step, every 2 steps, after the last
    assert [r["step"] for r in rows if "reward_total" in r] == [1, 2, 3]
    for r in rows:
        if "eval_tas" in r:
            assert r["eval_samples"] == 4
            assert 0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_format"] <= 1
            assert r["eval_tas"] > 0 and 0 < r["eval_reward_attention"] < 1
            summed = r["eval_reward_attention"] + r["eval_format"] + r["eval_accuracy"]   # tiny.yaml: weights 1, 1, 1
            assert abs(r["eval_reward_total"] - summed) < 1e-12


def test_eval_interval_needs_an_eval_file(tiny_ckpt, held_out):
    from megatron_sayo.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="eval.interval > 0 needs data.eval_file"):
        config_from_dict({"model": {"hf_path": str(tiny_ckpt)}, "data": {"train_file": str(held_out)},
                          "eval": {"interval": 5}})
