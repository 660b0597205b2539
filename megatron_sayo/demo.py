"""`make demo`: the embedded default end to end on CPU — a tiny random Qwen2.5-VL, a synthetic grounded task,
SAYO GRPO at TP=2 on two local gloo ranks into runs/demo/, then a short summary of what changed.

    python -m megatron_sayo.demo [key=value overrides for the run config]
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

from megatron_sayo.rl import plots
from megatron_sayo.rl.metrics import METRICS_FILE, read_metrics

DEFAULT_CONFIG = files("megatron_sayo") / "configs" / "tiny.yaml"


def window_mean(rows: list[dict], key: str, first: bool, n: int = 5) -> float:
    """Mean of `key` over the first (or last) n rows that carry it."""
    having = [r for r in rows if key in r]
    part = having[:n] if first else having[-n:]
    return sum(r[key] for r in part) / max(1, len(part))


def heldout_lines(rows: list[dict]) -> list[str]:
    """Held-out metrics before the first GRPO step and after the last (eval.interval rows)."""
    evals = [r for r in rows if "eval_tas" in r]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    lines = ["", f"{'held-out (%d samples)' % first['eval_samples']:<24}{'step %d' % first['step']:>12}"
                 f"{'step %d' % last['step']:>12}"]
    for key in ("eval_accuracy", "eval_format", "eval_tas", "eval_reward_attention"):
        lines.append(f"{key:<24}{first[key]:>12.4f}{last[key]:>12.4f}")
    return lines


def summary(run_dir: Path) -> str:
    """Start-vs-end rewards and TAS, and where the checkpoint, metrics and plots are."""
    try:
        rows = read_metrics(run_dir / METRICS_FILE)
    except (OSError, ValueError) as exc:
        return f"no metrics to summarise: {exc}"
    steps = [r for r in rows if "reward_total" in r]
    if not steps:
        return f"no training steps in {run_dir / METRICS_FILE}"
    lines = [f"SAYO GRPO demo: {len(steps)} steps logged in {run_dir}", "",
             f"{'metric':<18}{'first 5 steps':>15}{'last 5 steps':>15}"]
    for key in ("reward_total", "reward_attention", "reward_format", "reward_accuracy", "tas", "entropy",
                "completion_tokens"):
        lines.append(f"{key:<18}{window_mean(steps, key, True):>15.4f}{window_mean(steps, key, False):>15.4f}")
    lines += heldout_lines(rows)
    wall = sum(r["time_step"] for r in steps)
    lines += ["", f"training wall time {wall:.0f} s ({wall / len(steps):.1f} s/step)",
              f"metrics      {run_dir / 'metrics.jsonl'}",
              f"checkpoints  {run_dir / 'checkpoints'}",
              f"plots        {run_dir / 'plots'}/overview.png  (python tools/plot_metrics.py {run_dir})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_sayo.train", "--config", str(DEFAULT_CONFIG), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    run_dir = Path(next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), "runs/demo"))
    if rc == 0:
        plots.main([str(run_dir)])
    print()
    print(summary(run_dir))
    return rc


if __name__ == "__main__":
    sys.exit(main())
