"""A run's metrics.jsonl: the logger that writes it (one JSON line per step on the logging rank, mirrored to
TensorBoard when installed) and the one reader (demo summary, plots)."""

from __future__ import annotations

import json
import logging
import time
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


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class MetricsLogger:
    """One line per step on the logging rank (with an ETA), metrics.jsonl (appended per line), TensorBoard
    (extra `tensorboard`) and Weights & Biases (`log.wandb`, offline unless log.wandb_mode says online)."""

    def __init__(self, run_dir: Path, active: bool, total_steps: int, tensorboard: bool, wandb=None,
                 run_config: dict | None = None, print_every: int = 1):
        self.active, self.total, self.print_every = active, total_steps, print_every
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        self.wandb = None
        self.t0, self.first_step = time.monotonic(), None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("log.tensorboard: tensorboard is not installed (pip install -e '.[tensorboard]'): "
                            "metrics go to metrics.jsonl only")
        if active and wandb is not None:
            self.wandb = start_wandb(Path(run_dir), wandb, run_config)

    def eta(self, step: int) -> str:
        """Time left at this rate (wall time per step since this process's first logged step, evaluations
        included)."""
        done = step - (self.first_step if self.first_step is not None else step - 1)
        left = (time.monotonic() - self.t0) / max(done, 1) * max(self.total - step, 0)
        return format_duration(left)

    def log(self, metrics: dict) -> None:
        if not self.active or not metrics:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if "reward_total" in metrics and self.first_step is None:
            self.first_step = step - 1
        if "eval_tas" in metrics:
            m = metrics
            print(f"eval {step:>5}/{self.total}  accuracy {m['eval_accuracy']:.3f}  format {m['eval_format']:.3f}"
                  f"  tas {m['eval_tas']:.3f}  attn {m['eval_reward_attention']:.4f}"
                  f"  ({m['eval_samples']} held-out samples, {m['time_eval']:.1f}s)", flush=True)
        if "reward_total" in metrics and (step % self.print_every == 0 or step == self.total):
            m = metrics
            print(f"step {step:>5}/{self.total}  reward {m['reward_total']:+.4f}  attn {m['reward_attention']:+.4f}"
                  f"  fmt {m['reward_format']:.3f}  acc {m['reward_accuracy']:.3f}  tas {m['tas']:.3f}"
                  f"  loss {m.get('loss', 0):+.4f}  kl {m.get('kl', 0):.2e}  len {m['completion_tokens']:.1f}"
                  f"  {m['tokens_per_s']:.0f} tok/s  {m['time_step']:.1f}s  eta {self.eta(step)}", flush=True)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close TensorBoard and W&B (a W&B offline run is then complete on disk)."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run_dir: Path, cfg, run_config: dict | None = None):
    """A W&B run for `cfg` (LogConfig) recording `run_config`: offline by default (written under run_dir/wandb,
    nothing sent; `wandb sync` uploads it later); online only with log.wandb_mode = online."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("log.wandb = true needs the wandb package (pip install wandb)") from None
    return wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir), mode=cfg.wandb_mode,
                      config=run_config)
