"""Training curves from a GRPO run's metrics.jsonl:

    python -m megatron_sayo.rl.plots RUN_DIR [--out DIR] [--smooth K]     (or tools/plot_metrics.py)

Writes one PNG per group into RUN_DIR/plots/ (rewards, tas, kl, entropy, length, loss) and overview.png (all
groups in a grid). Raw values are drawn thin, a trailing moving average (K steps) thick. Missing metrics are
skipped; a missing or empty metrics.jsonl is an error.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from megatron_sayo.rl.metrics import METRICS_FILE, read_metrics

GROUPS = {
    "rewards": ("Rewards", ["reward_total", "reward_attention", "reward_format", "reward_accuracy"], "reward"),
    "tas": ("Target attention score (TAS)", ["tas", "eval_tas"],
            "TAS = A / V: region vs image-mean attention\n(selected tokens, docs/spec.md §3)"),
    "heldout": ("Held-out evaluation", ["eval_accuracy", "eval_format", "eval_reward_attention"], "mean over samples"),
    "kl": ("KL to the reference policy", ["kl"], "KL per token"),
    "entropy": ("Token entropy", ["entropy"], "nats"),
    "length": ("Response length", ["completion_tokens"], "tokens"),
    "loss": ("Policy loss", ["loss", "pg_loss"], "loss per token"),
    "grad_norm": ("Gradient norm (before clipping)", ["grad_norm"], "L2 norm"),
}


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a metric over the rows that have a finite value for it (last write of a step wins)."""
    by_step = {}
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[row.get("step", i + 1)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def moving_average(values: list[float], k: int) -> list[float]:
    """Trailing mean over up to k values."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def draw_group(ax, rows: list[dict], keys: list[str], ylabel: str, smooth: int) -> bool:
    """Draw a group's metrics on one axis; False when none of them is present."""
    drawn = False
    for idx, key in enumerate(keys):
        steps, values = series(rows, key)
        if not steps:
            continue
        colour = f"C{idx}"
        if smooth > 1 and len(values) > smooth and not key.startswith("eval_"):  # evaluations: few points, raw
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
            ax.plot(steps, moving_average(values, smooth), color=colour, linewidth=2, label=f"{key} (avg {smooth})")
        else:
            ax.plot(steps, values, color=colour, linewidth=2, marker="o" if len(values) < 30 else None,
                    markersize=4, label=key)
        drawn = True
    if drawn and "tas" in keys:
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="TAS = 1 (region = image mean)")
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return drawn


def trained_steps(rows: list[dict]) -> int:
    """The last GRPO step logged (a step-0 evaluation row is not a step)."""
    return max((int(r["step"]) for r in rows if "reward_total" in r), default=0)


def plot_run(run_dir: Path, out_dir: Path | None = None, smooth: int = 0) -> list[Path]:
    """Write the PNGs for a run; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / METRICS_FILE)
    out_dir = Path(out_dir or Path(run_dir) / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    smooth = smooth or max(1, len(rows) // 20)
    written = []
    present = []
    for name, (title, keys, ylabel) in GROUPS.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if draw_group(ax, rows, keys, ylabel, smooth):
            ax.set_title(title)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=110)
            written.append(out_dir / f"{name}.png")
            present.append(name)
        plt.close(fig)
    if present:
        cols = 3 if len(present) > 4 else 2
        nrows = math.ceil(len(present) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, present):
            title, keys, ylabel = GROUPS[name]
            draw_group(ax, rows, keys, ylabel, smooth)
            ax.set_title(title, fontsize=10)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        fig.suptitle(f"{Path(run_dir).resolve().name}: {trained_steps(rows)} steps", fontsize=12)
        fig.tight_layout()
        fig.savefig(out_dir / "overview.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "overview.png")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="PNG training curves from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir", help="a training run directory (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/plots)")
    p.add_argument("--smooth", type=int, default=0, help="moving-average window (default: steps / 20)")
    args = p.parse_args(argv)
    try:
        paths = plot_run(Path(args.run_dir), args.out and Path(args.out), args.smooth)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
