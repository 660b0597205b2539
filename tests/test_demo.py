"""The end-of-run summary (every run) and the demo's start -> end block: training rewards over the first/last
WINDOW steps, held-out figures at the first and last evaluation (a step-0 row carries only eval_* keys and must
not disturb the step windows), the count of steps without learning signal, and where the outputs are."""

from __future__ import annotations

import json

import numpy as np
import torch

from megatron_sayo.demo import start_end, summary
from megatron_sayo.rl.diagnostics import flat_groups
from megatron_sayo.rl.metrics import format_duration
from megatron_sayo.rl.summary import WINDOW

STEPS = 2 * WINDOW + 3


def write_run(tmp_path, flat_steps=()):
    rows = [{"step": 0, "eval_accuracy": 0.125, "eval_format": 0.5, "eval_tas": 0.97, "eval_reward_attention": 0.48,
             "eval_samples": 32, "eval_reward_total": 1.105}]
    for step in range(1, STEPS + 1):
        rows.append({"step": step, "reward_total": 1.0 + step, "reward_attention": 0.5, "reward_format": 0.1 * step,
                     "reward_accuracy": 0.01 * step, "tas": 1.0, "entropy": 1.0, "completion_tokens": 18.0,
                     "time_step": 0.5, "groups": 4, "groups_no_signal": 4 if step in flat_steps else 1})
    rows[-1].update(eval_accuracy=0.375, eval_format=1.0, eval_tas=1.04, eval_reward_attention=0.52, eval_samples=32,
                    eval_reward_total=1.895)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_shows_training_windows_and_heldout_start_and_end(tmp_path):
    write_run(tmp_path, flat_steps=(2, 5, 9))
    text = summary(tmp_path).splitlines()
    line = next(ln for ln in text if ln.startswith("reward_total"))
    first, last = (float(v) for v in line.split()[1:])
    rewards = 1.0 + np.arange(1, STEPS + 1)
    assert first == np.mean(rewards[:WINDOW]) and last == np.mean(rewards[-WINDOW:])
    assert any("held-out (32 samples)" in ln and "step 0" in ln and f"step {STEPS}" in ln for ln in text)
    assert next(ln for ln in text if ln.startswith("eval_accuracy")).split()[1:] == ["0.1250", "0.3750"]
    assert next(ln for ln in text if ln.startswith("eval_tas")).split()[1:] == ["0.9700", "1.0400"]
    assert f"{STEPS} steps logged" in text[0]
    assert any(ln.startswith("steps with no learning signal") and ln.endswith(f": 3 of {STEPS}") for ln in text)


def test_demo_block_names_start_end_and_the_outputs(tmp_path):
    write_run(tmp_path)
    text = start_end(tmp_path, wall=97.4, heatmap=tmp_path / "heatmap" / "heatmap.png")
    rows = {ln.split("  ")[0]: ln.split()[-2:] for ln in text.splitlines()}
    assert rows["held-out accuracy (32 questions)"] == ["0.125", "0.375"]
    assert rows["held-out TAS"] == ["0.970", "1.040"] and rows["held-out attention reward"] == ["0.480", "0.520"]
    assert rows["held-out reward_total"] == ["1.105", "1.895"]
    rewards = 1.0 + np.arange(1, STEPS + 1)
    assert rows[f"reward_total (training, {WINDOW} steps)"] == [f"{np.mean(rewards[:WINDOW]):.3f}",
                                                                 f"{np.mean(rewards[-WINDOW:]):.3f}"]
    assert "97 s wall time" in text and f"plots    {tmp_path / 'plots'}/overview.png" in text
    assert f"heatmap  {tmp_path / 'heatmap' / 'heatmap.png'}" in text


def test_flat_groups_counts_groups_whose_rewards_are_all_equal():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, size=40)
    rewards = rng.normal(size=40)
    for g in (1, 4):                                   # two groups get one reward for all their completions
        rewards[ids == g] = 0.25 * g
    present = set(ids.tolist())
    want = sum(1 for g in present if np.ptp(rewards[ids == g]) <= 1e-6)
    assert want == len({1, 4} & present)
    assert flat_groups(torch.tensor(rewards), torch.tensor(ids)) == want
    assert flat_groups(torch.ones(8), torch.tensor([3, 3, 9, 9, 9, 11, 11, 11])) == 3


def test_eta_format():
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
