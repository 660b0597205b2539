"""The end-of-run summary every training run prints (and `make demo` after it): start -> end of the training
rewards and of the held-out evaluation, steps without learning signal, wall time, where the outputs are."""

from __future__ import annotations

from pathlib import Path

from megatron_sayo.rl.metrics import METRICS_FILE, read_metrics

TRAIN_KEYS = ("reward_total", "reward_attention", "reward_format", "reward_accuracy", "tas", "entropy",
              "completion_tokens")
HELDOUT_KEYS = ("eval_accuracy", "eval_format", "eval_tas", "eval_reward_attention", "eval_reward_total")
WINDOW = 10   # steps averaged at each end of the training columns (a step's 4-16 prompts are a noisy sample)


def window_mean(rows: list[dict], key: str, first: bool, n: int = WINDOW) -> float:
    """Mean of `key` over the first (or last) n rows that carry it."""
    having = [r for r in rows if key in r]
    part = having[:n] if first else having[-n:]
    return sum(r[key] for r in part) / max(1, len(part))


def heldout_lines(rows: list[dict]) -> list[str]:
    """Held-out metrics at the first evaluation (before the first GRPO step) and the last (after the last)."""
    evals = [r for r in rows if "eval_tas" in r]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    lines = ["", f"{'held-out ({} samples)'.format(first['eval_samples']):<24}"
                 f"{'step {}'.format(first['step']):>12}{'step {}'.format(last['step']):>12}"]
    for key in HELDOUT_KEYS:
        if key in first and key in last:
            lines.append(f"{key:<24}{first[key]:>12.4f}{last[key]:>12.4f}")
    return lines


def no_signal_steps(steps: list[dict]) -> int:
    """Steps on which every prompt group had zero reward variance (all advantages 0: nothing to learn)."""
    return sum(1 for r in steps if "groups" in r and r.get("groups_no_signal") == r["groups"])


def run_summary(run_dir: Path, title: str = "run summary") -> str:
    """Start-vs-end rewards and TAS, held-out start and end, steps with no signal, and where the checkpoints,
    metrics and plots are; a line saying what is missing when the run logged nothing."""
    run_dir = Path(run_dir)
    try:
        rows = read_metrics(run_dir / METRICS_FILE)
    except (OSError, ValueError) as exc:
        return f"no metrics to summarise: {exc}"
    steps = [r for r in rows if "reward_total" in r]
    if not steps:
        return f"no training steps in {run_dir / METRICS_FILE}"
    lines = [f"{title}: {len(steps)} steps logged in {run_dir}", "",
             f"{'metric':<18}{f'first {WINDOW} steps':>15}{f'last {WINDOW} steps':>15}"]
    for key in TRAIN_KEYS:
        lines.append(f"{key:<18}{window_mean(steps, key, True):>15.4f}{window_mean(steps, key, False):>15.4f}")
    lines += heldout_lines(rows)
    wall = sum(r["time_step"] for r in steps)
    flat = no_signal_steps(steps)
    lines += ["", f"steps with no learning signal (every group's rewards equal): {flat} of {len(steps)}",
              f"time in GRPO steps {wall:.0f} s ({wall / len(steps):.2f} s/step; without start-up, evaluations and "
              f"checkpoints)",
              f"metrics      {run_dir / METRICS_FILE}",
              f"checkpoints  {run_dir / 'checkpoints'}",
              f"plots        python -m megatron_sayo.rl.plots {run_dir}  (writes {run_dir / 'plots'}/overview.png)"]
    return "\n".join(lines)
