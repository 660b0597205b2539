"""`make demo`: the embedded default end to end on CPU — a tiny random Qwen2.5-VL, the synthetic `tiles` task, a
short cached supervised warm-up, then SAYO GRPO at TP=2 on two local gloo ranks into runs/demo/; then the plots,
an attention heatmap of one held-out answer, and what changed from the first held-out evaluation to the last.

    python -m megatron_sayo.demo [key=value overrides for the run config]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from megatron_sayo.config import ConfigError, load_config
from megatron_sayo.rl.metrics import METRICS_FILE, read_metrics
from megatron_sayo.rl.summary import WINDOW, run_summary, window_mean

DEFAULT_CONFIG = files("megatron_sayo") / "configs" / "demo.yaml"
REPORT_TOOL = Path(__file__).resolve().parents[1] / "tools" / "attention_report.py"
HEATMAP_DIR = "heatmap"


def summary(run_dir: Path) -> str:
    """The run's full summary (rl/summary.py) under the demo's title."""
    return run_summary(run_dir, title="SAYO GRPO demo")


def start_end(run_dir: Path, wall: float | None = None, heatmap: Path | None = None) -> str:
    """What changed: held-out accuracy, TAS and attention reward at the first and the last evaluation, the
    training reward_total over the first and last steps, and where the plots and the heatmap are."""
    try:
        rows = read_metrics(Path(run_dir) / METRICS_FILE)
    except (OSError, ValueError) as exc:
        return f"no metrics to summarise: {exc}"
    evals = [r for r in rows if "eval_tas" in r]
    steps = [r for r in rows if "reward_total" in r]
    if not evals or not steps:
        return f"{run_dir}: no held-out evaluation or no training step logged"
    first, last = evals[0], evals[-1]
    lines = [f"SAYO GRPO demo: {run_dir}, {len(steps)} GRPO steps"
             + (f", {wall:.0f} s wall time for the whole command" if wall is not None else ""),
             f"{'':<34}{'start':>9}{'end':>9}",
             f"{'held-out accuracy ({} questions)'.format(first['eval_samples']):<34}"
             f"{first['eval_accuracy']:>9.3f}{last['eval_accuracy']:>9.3f}",
             f"{'held-out TAS':<34}{first['eval_tas']:>9.3f}{last['eval_tas']:>9.3f}",
             f"{'held-out attention reward':<34}{first['eval_reward_attention']:>9.3f}"
             f"{last['eval_reward_attention']:>9.3f}"]
    if "eval_reward_total" in first and "eval_reward_total" in last:
        lines.append(f"{'held-out reward_total':<34}{first['eval_reward_total']:>9.3f}"
                     f"{last['eval_reward_total']:>9.3f}")
    lines += [f"{f'reward_total (training, {WINDOW} steps)':<34}{window_mean(steps, 'reward_total', True):>9.3f}"
              f"{window_mean(steps, 'reward_total', False):>9.3f}",
              f"(held-out: step {first['step']}, before the first GRPO step, and step {last['step']}; training: "
              f"the mean over the first and the last {WINDOW} steps' sampled completions)",
              f"plots    {Path(run_dir) / 'plots'}/overview.png"]
    if heatmap is not None:
        lines.append(f"heatmap  {heatmap}  (attention of one held-out answer, the final policy)")
    return "\n".join(lines)


def start_heatmap(run_dir: Path, cfg) -> tuple[subprocess.Popen, Path] | None:
    """Start tools/attention_report.py on the final checkpoint for the first held-out question, answered greedily
    (top_p 0.01 keeps only the most likely token; entropies at temperature 1 as in training); None without the
    tool. finish_heatmap waits for it."""
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.rl.prompts import conversation

    if not REPORT_TOOL.is_file():
        print(f"heatmap skipped: {REPORT_TOOL} is not here (run the demo from a clone of the repository)")
        return None
    sample = load_grounded(cfg.data.eval_file)[0]
    text = next(c["text"] for c in conversation(sample, cfg.data.instruction)[0]["content"] if c["type"] == "text")
    out = Path(run_dir) / HEATMAP_DIR
    cmd = [sys.executable, str(REPORT_TOOL), "--megatron", str(run_dir), "--image", str(sample.image_path),
           "--bbox", ",".join(str(v) for v in sample.boxes[0]), "--prompt", text,
           "--generate", str(cfg.rollout.max_new_tokens), "--temperature", "1", "--top-p", "0.01",
           "--top-entropy-ratio", str(cfg.reward.top_entropy_ratio), "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, out / "heatmap.png"


def finish_heatmap(started: tuple[subprocess.Popen, Path] | None) -> Path | None:
    """The heatmap's path once its process has ended well; None (and its error) otherwise."""
    if started is None:
        return None
    proc, path = started
    _, err = proc.communicate()
    if proc.returncode != 0:
        print(f"heatmap failed ({proc.returncode}):\n{err[-2000:]}")
        return None
    return path


def main(argv=None) -> int:
    t0 = time.monotonic()
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(str(DEFAULT_CONFIG), overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_sayo.train", "--config", str(DEFAULT_CONFIG), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    run_dir = Path(cfg.run_dir)
    heatmap = None
    if rc == 0:
        from megatron_sayo.rl import plots

        started = start_heatmap(run_dir, cfg)   # one process for the heatmap while this one draws the plots
        plots.plot_run(run_dir)
        heatmap = finish_heatmap(started)
    print()
    print(start_end(run_dir, time.monotonic() - t0, heatmap))
    return rc


if __name__ == "__main__":
    sys.exit(main())
