"""megatron_sayo.rl.plots (tools/plot_metrics.py) on a metrics.jsonl with the trainer's field names: PNGs written,
readable, sized."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def tool():
    from megatron_sayo.rl import plots
    return plots


def trainer_row(step: int) -> dict:
    """One line as GRPOTrainer + MetricsLogger write it."""
    return dict(step=step, reward_total=1.0 + 0.01 * step, reward_attention=0.5, reward_format=0.3 + 0.01 * step,
                reward_accuracy=0.2, tas=1.0 + 0.02 * step, entropy=1.5 - 0.01 * step,
                completion_tokens=100.0 - step, loss=0.01, pg_loss=0.01, kl=1e-3 * step, clip_fraction=0.0,
                grad_norm=float("nan") if step == 3 else 1.0, lr=1e-6, tokens_per_s=250.0, skipped=step == 3,
                time_rollout=1.0, time_score=0.5, time_reference=0.5, time_update=1.0, time_step=3.0,
                sample_completion="<answer>red</answer>")


def test_plots_from_trainer_metrics(tool, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(trainer_row(s)) for s in range(1, 26)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 26, "rew')   # torn last line
    assert tool.main([str(run)]) == 0
    names = {p.name for p in (run / "plots").glob("*.png")}
    assert {"rewards.png", "tas.png", "kl.png", "entropy.png", "length.png", "overview.png"} <= names
    for name in names:
        with Image.open(run / "plots" / name) as im:
            assert im.size[0] >= 600 and im.size[1] >= 400
            assert len(set(im.convert("L").getdata())) > 10     # something was drawn


def test_series_skips_nan_and_moving_average(tool):
    rows = [trainer_row(s) for s in range(1, 6)]
    steps, values = tool.series(rows, "grad_norm")
    assert steps == [1, 2, 4, 5] and all(math.isfinite(v) for v in values)
    assert tool.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_missing_or_empty_metrics_is_a_clear_error(tool, tmp_path, capsys):
    assert tool.main([str(tmp_path)]) == 2
    assert "no metrics file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert tool.main([str(tmp_path)]) == 2
    assert "no metrics rows" in capsys.readouterr().err


def test_heldout_plot_from_eval_rows(tool, tmp_path):
    """Rows carrying eval_* (step 0 holds only them) give heldout.png, and eval_tas joins the TAS plot."""
    run = tmp_path / "run"
    run.mkdir()
    evals = {0: 0.2, 5: 0.3, 10: 0.45}
    rows = [{"step": 0, "eval_accuracy": 0.2, "eval_format": 0.5, "eval_tas": 1.0, "eval_reward_attention": 0.5}]
    for s in range(1, 11):
        row = trainer_row(s)
        if s in evals:
            row.update(eval_accuracy=evals[s], eval_format=0.9, eval_tas=1.0 + evals[s], eval_reward_attention=0.6)
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tool.main([str(run)]) == 0
    assert (run / "plots" / "heldout.png").is_file()
    assert tool.series(rows, "eval_accuracy") == ([0, 5, 10], [0.2, 0.3, 0.45])
    assert tool.series(rows, "reward_total")[0] == list(range(1, 11))
