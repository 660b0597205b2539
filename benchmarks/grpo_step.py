"""GRPO step time with the scores captured at decode (rollout.capture_scores) vs a teacher-forced scoring pass.

Two trainers start from the same checkpoint with the same seed, one with capture on and one off, and take
steps in turn (the order alternates every step, so load on the machine hits both alike). Prints the median
seconds of each phase (rollout, scoring, reference, update, whole step) side by side with the ratio
on / off, and the mean rewards of both runs (they follow the same prompts and seeds: the rewards must agree).
Two models: the demo config (`megatron_sayo/configs/tiny.yaml`, TP=2 on two local ranks, its tiny random
checkpoint) and the same config on the ~57M-parameter model of benchmarks/rollout.py. Warm-up is skipped
(warmup.steps=0): a random policy writes the full max_new_tokens, the longest rollout.

    python benchmarks/grpo_step.py [--model demo|57m|both] [--steps 8] [--skip 1] [--cache DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "megatron_sayo" / "configs" / "tiny.yaml"
PHASES = ("time_rollout", "time_score", "time_reference", "time_update", "time_step")
REWARDS = ("reward_total", "reward_attention", "reward_format", "tas", "completion_tokens")


def _rank(overrides: list[str], run_dir: str, steps: int) -> dict | None:
    """On every rank: two trainers (capture off / on) stepping in turn; the logging rank returns their metrics."""
    from megatron_sayo.config import load_config
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.trainer import GRPOTrainer

    cfgs = {mode: load_config(str(CONFIG), overrides + [f"rollout.capture_scores={mode == 'on'}",
                                                        f"run_dir={run_dir}/{mode}"]) for mode in ("off", "on")}
    runtime.init_distributed(cfgs["on"].parallel.tp, cfgs["on"].parallel.pp)
    runtime.seed_everything(cfgs["on"].train.seed)
    samples = load_grounded(cfgs["on"].data.train_file)
    trainers = {mode: GRPOTrainer(cfg, cfg.model.hf_path, samples) for mode, cfg in cfgs.items()}
    rows: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(steps):
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
            rows[mode].append(trainers[mode].train_step().metrics)
    return rows if trainers["on"].is_logger else None


def median(rows: list[dict], key: str, skip: int) -> float:
    return statistics.median(r[key] for r in rows[skip:])


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def report(name: str, rows: dict, skip: int) -> None:
    n = len(rows["on"]) - skip
    print(f"\n{name}: median over {n} interleaved steps per mode (first {skip} dropped)")
    print(f"{'phase (s)':<16}{'capture off':>12}{'capture on':>12}{'on/off':>9}")
    for key in PHASES:
        off, on = median(rows["off"], key, skip), median(rows["on"], key, skip)
        ratio = f"{on / off:.2f}" if off > 0 else "-"
        print(f"{key[5:]:<16}{off:>12.3f}{on:>12.3f}{ratio:>9}")
    print(f"{'mean over steps':<16}{'capture off':>12}{'capture on':>12}")
    for key in REWARDS:
        print(f"{key:<16}{mean(rows['off'], key):>12.4f}{mean(rows['on'], key):>12.4f}")


def run(name: str, ckpt: Path, data: Path, steps: int, skip: int, tp: int) -> None:
    from megatron_sayo.distributed.runtime import spawn_local

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"model.hf_path={ckpt}", "model.make_tiny_if_missing=false", f"data.train_file={data}",
                     "data.eval_file=null", "data.synthetic_n=0", "warmup.steps=0", "log.tensorboard=false",
                     "checkpoint.interval=0", f"train.steps={steps}", f"parallel.tp={tp}"]
        results = spawn_local(_rank, tp, overrides, run_dir, steps, timeout_s=3600)
    report(name, next(r for r in results if r is not None), skip)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("demo", "57m", "both"), default="both")
    p.add_argument("--steps", type=int, default=8, help="steps per mode")
    p.add_argument("--skip", type=int, default=1, help="first steps per mode left out of the medians")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_grpo_step")
    args = p.parse_args(argv)
    if args.steps <= args.skip:
        p.error("--steps must exceed --skip")

    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint
    from megatron_sayo.train import write_synthetic

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rollout import ensure_checkpoint  # the 57M benchmark model  # noqa: E402

    args.cache.mkdir(parents=True, exist_ok=True)
    data = args.cache / "train.jsonl"
    if not data.exists():
        write_synthetic(data, 64, seed=0)
    if args.model in ("demo", "both"):
        tiny = args.cache / "tiny_ckpt"
        if not (tiny / "config.json").exists():
            make_tiny_checkpoint(tiny, preset="tiny", seed=0)
        run("demo config (tiny model, TP=2)", tiny, data, args.steps, args.skip, tp=2)
    if args.model in ("57m", "both"):
        run("demo config on the 57M benchmark model (TP=2)", ensure_checkpoint(args.cache / "ckpt_57m"), data,
            args.steps, args.skip, tp=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
