"""The demo's summary: training rewards over the first/last 5 steps, and held-out accuracy / TAS at the first and
last evaluation (a step-0 row carries only eval_* keys and must not disturb the step windows)."""

from __future__ import annotations

import json

import numpy as np

from megatron_sayo.demo import summary


def test_summary_shows_heldout_start_and_end(tmp_path):
    rows = [{"step": 0, "eval_accuracy": 0.125, "eval_format": 0.5, "eval_tas": 0.97, "eval_reward_attention": 0.48,
             "eval_samples": 32}]
    for step in range(1, 13):
        rows.append({"step": step, "reward_total": 1.0 + step, "reward_attention": 0.5, "reward_format": 0.1 * step,
                     "reward_accuracy": 0.01 * step, "tas": 1.0, "entropy": 1.0, "completion_tokens": 18.0,
                     "time_step": 0.5})
    rows[-1].update(eval_accuracy=0.375, eval_format=1.0, eval_tas=1.04, eval_reward_attention=0.52, eval_samples=32)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summary(tmp_path).splitlines()
    line = next(l for l in text if l.startswith("reward_total"))
    first, last = (float(v) for v in line.split()[1:])
    assert first == np.mean([2, 3, 4, 5, 6]) and last == np.mean([9, 10, 11, 12, 13])
    assert any("held-out (32 samples)" in l and "step 0" in l and "step 12" in l for l in text)
    assert next(l for l in text if l.startswith("eval_accuracy")).split()[1:] == ["0.1250", "0.3750"]
    assert next(l for l in text if l.startswith("eval_tas")).split()[1:] == ["0.9700", "1.0400"]
    assert "12 steps logged" in text[0]
