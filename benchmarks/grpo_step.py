"""GRPO step time with the scores captured at decode (rollout.capture_scores) vs a teacher-forced scoring pass.

Two trainers start from the same checkpoint with the same seed, one with capture on and one off, and take
steps in turn (the order alternates every step, so load on the machine hits both alike). Prints the median
seconds of each phase (rollout, scoring, reference, update, whole step) side by side with the ratio
on / off, and the mean rewards of both runs (they follow the same prompts and seeds: the rewards must agree).
Two models: the demo config (`megatron_sayo/configs/tiny.yaml`, TP=2 on two local ranks, its tiny random
checkpoint) and the same config on the ~57M-parameter model of benchmarks/rollout.py. Warm-up is skipped
(warmup.steps=0): a random policy writes the full max_new_tokens, the longest rollout.

    python benchmarks/grpo_step.py [--model demo|57m|both] [--steps 8] [--skip 1] [--cache DIR]

`--baseline-rev REV` compares against the code as it was at REV instead (a `git worktree` of it under --cache):
runs of the old code with capture off (its teacher-forced scoring) and of this code with capture on alternate,
each in fresh processes, --repeats times; prints the medians side by side with the ratio new / old and both
runs' rewards per step (the same seed: equal while the sampled tokens agree).

    python benchmarks/grpo_step.py --model 57m --baseline-rev 7dfc291 [--steps 5] [--skip 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time_rollout", "time_score", "time_reference", "time_update", "time_step")
REWARDS = ("reward_total", "reward_attention", "reward_format", "tas", "completion_tokens")


def _rank(overrides: list[str], run_dir: str, steps: int, modes: tuple[str, ...] = ("off", "on")) -> dict | None:
    """On every rank: one trainer per capture mode, stepping in turn (the order alternates every step); the
    logging rank returns their metrics. The config is the demo config of the megatron_sayo imported here."""
    import megatron_sayo
    from megatron_sayo.config import load_config
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.trainer import GRPOTrainer

    config = Path(megatron_sayo.__file__).parent / "configs" / "tiny.yaml"
    cfgs = {mode: load_config(str(config), overrides + [f"rollout.capture_scores={mode == 'on'}",
                                                        f"run_dir={run_dir}/{mode}"]) for mode in modes}
    first = cfgs[modes[0]]
    runtime.init_distributed(first.parallel.tp, first.parallel.pp)
    runtime.seed_everything(first.train.seed)
    samples = load_grounded(first.data.train_file)
    trainers = {mode: GRPOTrainer(cfg, cfg.model.hf_path, samples) for mode, cfg in cfgs.items()}
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    for i in range(steps):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            rows[mode].append(trainers[mode].train_step().metrics)
    return rows if trainers[modes[0]].is_logger else None


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


def run_modes(ckpt: Path, data: Path, steps: int, tp: int, modes: tuple[str, ...]) -> dict:
    """Per mode, the metrics of `steps` GRPO steps on `tp` local ranks of the megatron_sayo imported here."""
    from megatron_sayo.distributed.runtime import spawn_local

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"model.hf_path={ckpt}", "model.make_tiny_if_missing=false", f"data.train_file={data}",
                     "data.eval_file=null", "data.synthetic_n=0", "eval.interval=0", "warmup.steps=0", "log.tensorboard=false",
                     "checkpoint.interval=0", f"train.steps={steps}", f"parallel.tp={tp}"]
        results = spawn_local(_rank, tp, overrides, run_dir, steps, modes, timeout_s=3600)
    return next(r for r in results if r is not None)


def run(name: str, ckpt: Path, data: Path, steps: int, skip: int, tp: int) -> None:
    report(name, run_modes(ckpt, data, steps, tp, ("off", "on")), skip)


# ---------------------------------------------------------------------------------------------- --baseline-rev

def baseline_tree(rev: str, cache: Path) -> Path:
    """A detached `git worktree` of `rev` under `cache` (made once): the old code the new is compared with."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = cache / f"rev_{sha[:12]}"
    if not (tree / "megatron_sayo").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha], check=True)
    return tree


def run_in_tree(tree: Path, ckpt: Path, data: Path, steps: int, tp: int, mode: str) -> list[dict]:
    """`run_modes` for one mode in a fresh process that imports megatron_sayo from `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    job = json.dumps(dict(ckpt=str(ckpt), data=str(data), steps=steps, tp=tp, mode=mode))
    out = subprocess.run([sys.executable, __file__, "--worker", job], env=env, check=True, capture_output=True,
                         text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("ROWS "))
    return json.loads(line[5:])


def _worker(job: str) -> int:
    import megatron_sayo

    j = json.loads(job)
    rows = run_modes(Path(j["ckpt"]), Path(j["data"]), j["steps"], j["tp"], (j["mode"],))[j["mode"]]
    keep = PHASES + REWARDS
    print("ROWS " + json.dumps([{k: r[k] for k in keep} for r in rows]), flush=True)
    print(f"imported {megatron_sayo.__file__}", file=sys.stderr)
    return 0


def compare_with_rev(name: str, tree: Path, rev: str, ckpt: Path, data: Path, steps: int, skip: int, tp: int,
                     repeats: int) -> None:
    """Old code (capture off) and this code (capture on), runs alternating; medians pooled over the runs."""
    runs = {"old": [], "new": []}
    for i in range(repeats):
        for who in (("old", "new") if i % 2 == 0 else ("new", "old")):
            where, mode = (tree, "off") if who == "old" else (ROOT, "on")
            runs[who].append(run_in_tree(where, ckpt, data, steps, tp, mode))
    pooled = {who: [r for rows in rs for r in rows[skip:]] for who, rs in runs.items()}
    print(f"\n{name}: {rev} with capture off (old) vs this tree with capture on (new); {repeats} runs each, "
          f"alternating, {steps - skip} steps per run kept (first {skip} dropped): medians of {len(pooled['new'])}")
    print(f"{'phase (s)':<16}{'old, off':>12}{'new, on':>12}{'new/old':>9}")
    for key in PHASES:
        old, new = (statistics.median(r[key] for r in pooled[w]) for w in ("old", "new"))
        ratio = f"{new / old:.2f}" if old > 0 else "-"
        print(f"{key[5:]:<16}{old:>12.3f}{new:>12.3f}{ratio:>9}")
    print("reward_total per step (run 1), old | new:")
    print("  " + " ".join(f"{r['reward_total']:.4f}" for r in runs["old"][0]))
    print("  " + " ".join(f"{r['reward_total']:.4f}" for r in runs["new"][0]))
    print(f"{'mean over runs':<16}{'old, off':>12}{'new, on':>12}")
    for key in REWARDS:
        old, new = (sum(r[key] for rows in runs[w] for r in rows) / sum(map(len, runs[w])) for w in ("old", "new"))
        print(f"{key:<16}{old:>12.4f}{new:>12.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("demo", "57m", "both"), default="both")
    p.add_argument("--steps", type=int, default=8, help="steps per mode")
    p.add_argument("--skip", type=int, default=1, help="first steps per mode left out of the medians")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_grpo_step")
    p.add_argument("--baseline-rev", help="compare this tree (capture on) with the code at this git revision "
                                          "(capture off) instead of capture on/off on this tree")
    p.add_argument("--repeats", type=int, default=3, help="runs per side with --baseline-rev")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
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
    models = []
    if args.model in ("demo", "both"):
        tiny = args.cache / "tiny_ckpt"
        if not (tiny / "config.json").exists():
            make_tiny_checkpoint(tiny, preset="tiny", seed=0)
        models.append(("demo config (tiny model, TP=2)", tiny))
    if args.model in ("57m", "both"):
        models.append(("demo config on the 57M benchmark model (TP=2)", ensure_checkpoint(args.cache / "ckpt_57m")))
    tree = baseline_tree(args.baseline_rev, args.cache) if args.baseline_rev else None
    for name, ckpt in models:
        if tree is None:
            run(name, ckpt, data, args.steps, args.skip, tp=2)
        else:
            compare_with_rev(name, tree, args.baseline_rev, ckpt, data, args.steps, args.skip, 2, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
