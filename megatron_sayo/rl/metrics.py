"""A run's metrics.jsonl: the logger that writes it (one JSON line per step on the logging rank, mirrored to
TensorBoard when installed) and the one reader (demo summary, plots)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("megatron_sayo.train")

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (a torn last line, e.g. from a killed run, is ignored)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file (is this a run dir?)")
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


class MetricsLogger:
    """One line per step on the logging rank, metrics.jsonl (appended per line), TensorBoard."""

    def __init__(self, run_dir: Path, active: bool, total_steps: int, tensorboard: bool):
        self.active, self.total = active, total_steps
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, metrics: dict) -> None:
        if not self.active or not metrics:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if "eval_tas" in metrics:
            print(f"eval {step:>5}/{self.total}  accuracy {metrics['eval_accuracy']:.3f}  format "
                  f"{metrics['eval_format']:.3f}  tas {metrics['eval_tas']:.3f}  attn {metrics['eval_reward_attention']:.4f}"
                  f"  ({metrics['eval_samples']} held-out samples, {metrics['time_eval']:.1f}s)", flush=True)
        if "reward_total" in metrics:
            print(f"step {step:>5}/{self.total}  reward {metrics['reward_total']:+.4f}  attn {metrics['reward_attention']:+.4f}"
                  f"  fmt {metrics['reward_format']:.3f}  acc {metrics['reward_accuracy']:.3f}  tas {metrics['tas']:.3f}"
                  f"  loss {metrics.get('loss', 0):+.4f}  kl {metrics.get('kl', 0):.2e}  len {metrics['completion_tokens']:.1f}"
                  f"  {metrics['tokens_per_s']:.0f} tok/s  {metrics['time_step']:.1f}s", flush=True)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
