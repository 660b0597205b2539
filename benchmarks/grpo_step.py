"""GRPO step time with the scores captured at decode (rollout.capture_scores) vs a teacher-forced scoring pass.

Two trainers start from the same checkpoint with the same seed, one with capture on and one off, and take
steps in turn (the order alternates every step, so load on the machine hits both alike). Prints the median
seconds of each phase (rollout, scoring, reference, update, whole step) side by side with the ratio
on / off (and cpu_step: the step's CPU seconds summed over the ranks, the work done, which other jobs'
load barely moves), and the mean rewards of both runs (they follow the same prompts and seeds: the rewards must agree).
Two models: the demo config (`megatron_sayo/configs/tiny.yaml`, TP=2 on two local ranks, its tiny random
checkpoint) and the same config on the ~57M-parameter model of benchmarks/rollout.py. Warm-up is skipped
(warmup.steps=0): a random policy writes the full max_new_tokens, the longest rollout.

    python benchmarks/grpo_step.py [--model demo|57m|both] [--steps 8] [--skip 1] [--cache DIR]

`--baseline-rev REV` also compares against the code as it was at REV (a `git worktree` of it under --cache):
three process groups, the old code with capture off (its teacher-forced scoring), this code with capture off
and with capture on, take their steps in turn (one step each, order rotating, the others blocked), --repeats
runs; prints the medians side by side with the ratios new-on / old-off and new-on / new-off, and the three
sides' rewards per step (the same seed: equal while the sampled tokens agree).

    python benchmarks/grpo_step.py --model 57m --baseline-rev 7dfc291 [--steps 8] [--skip 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time_rollout", "time_score", "time_reference", "time_update", "time_step", "cpu_step")
REWARDS = ("reward_total", "reward_attention", "reward_format", "tas", "completion_tokens")


def _wait_for(path: Path, alive=lambda: True) -> None:
    """Block (polling every 2 ms, no CPU to speak of) until `path` exists."""
    while not path.exists():
        if not alive():
            raise RuntimeError(f"gave up waiting for {path}: the other side died")
        time.sleep(0.002)


def _timed_step(trainer) -> dict:
    """One step's metrics plus cpu_step: CPU seconds the step took summed over all ranks (work done, which
    load from other jobs on the machine barely moves, unlike the wall-clock time_*)."""
    import torch
    import torch.distributed as dist

    start = time.process_time()
    metrics = trainer.train_step().metrics
    cpu = torch.tensor([time.process_time() - start], dtype=torch.float64)
    dist.all_reduce(cpu)
    return {**metrics, "cpu_step": float(cpu)}


def _rank(overrides: list[str], run_dir: str, steps: int, modes: tuple[str, ...] = ("off", "on"),
          baton: str | None = None) -> dict | None:
    """On every rank: one trainer per capture mode, stepping in turn (the order alternates every step); the
    logging rank returns their metrics. The config is the demo config of the megatron_sayo imported here.
    `baton` (a directory): step i starts when the file go_<i> appears there; the logging rank then writes
    done_<i> (how --baseline-rev interleaves steps of separate process groups)."""
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
        if baton:
            _wait_for(Path(baton) / f"go_{i}")
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            rows[mode].append(_timed_step(trainers[mode]))
        if baton and trainers[modes[0]].is_logger:
            (Path(baton) / f"done_{i}.tmp").write_text("")
            os.replace(Path(baton) / f"done_{i}.tmp", Path(baton) / f"done_{i}")
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
        print(f"{key.removeprefix('time_'):<16}{off:>12.3f}{on:>12.3f}{ratio:>9}")
    print(f"{'mean over steps':<16}{'capture off':>12}{'capture on':>12}")
    for key in REWARDS:
        print(f"{key:<16}{mean(rows['off'], key):>12.4f}{mean(rows['on'], key):>12.4f}")


def run_modes(ckpt: Path, data: Path, steps: int, tp: int, modes: tuple[str, ...], baton: str | None = None) -> dict:
    """Per mode, the metrics of `steps` GRPO steps on `tp` local ranks of the megatron_sayo imported here."""
    from megatron_sayo.distributed.runtime import spawn_local

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"model.hf_path={ckpt}", "model.make_tiny_if_missing=false", f"data.train_file={data}",
                     "data.eval_file=null", "data.synthetic_n=0", "eval.interval=0", "warmup.steps=0", "log.tensorboard=false",
                     "checkpoint.interval=0", f"train.steps={steps}", f"parallel.tp={tp}"]
        results = spawn_local(_rank, tp, overrides, run_dir, steps, modes, baton, timeout_s=3600)
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


SIDES = (("old", "off"), ("new", "off"), ("new", "on"))   # (code, capture) of the three process groups


def _worker(job: str) -> int:
    import megatron_sayo

    j = json.loads(job)
    rows = run_modes(Path(j["ckpt"]), Path(j["data"]), j["steps"], j["tp"], (j["mode"],), j["baton"])[j["mode"]]
    keep = PHASES + REWARDS
    print("ROWS " + json.dumps([{k: r[k] for k in keep} for r in rows]), flush=True)
    print(f"imported {megatron_sayo.__file__}", file=sys.stderr)
    return 0


def lockstep(tree: Path, ckpt: Path, data: Path, steps: int, tp: int) -> dict[tuple[str, str], list[dict]]:
    """One run of the three SIDES, each its own process group (the old code's imports from `tree`), taking
    their steps in turn: step i of every side before step i + 1 of any, the order rotating every step, the
    idle groups blocked; so load on the machine falls on all three alike."""
    with tempfile.TemporaryDirectory() as batons:
        procs = {}
        for side in SIDES:
            baton = Path(batons) / "_".join(side)
            baton.mkdir()
            env = dict(os.environ, PYTHONPATH=str(tree if side[0] == "old" else ROOT))
            job = json.dumps(dict(ckpt=str(ckpt), data=str(data), steps=steps, tp=tp, mode=side[1],
                                  baton=str(baton)))
            procs[side] = (subprocess.Popen([sys.executable, __file__, "--worker", job], env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE), baton)
            time.sleep(3)   # each group has bound its rendezvous port before the next picks one
        try:
            for i in range(steps):
                for k in range(len(SIDES)):
                    side = SIDES[(i + k) % len(SIDES)]
                    proc, baton = procs[side]
                    (baton / f"go_{i}").write_text("")
                    _wait_for(baton / f"done_{i}", alive=lambda: proc.poll() is None)
            rows = {}
            for side, (proc, _) in procs.items():
                out, err = proc.communicate(timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"the {side} worker failed:\n{err[-3000:]}")
                rows[side] = json.loads(next(x for x in out.splitlines() if x.startswith("ROWS "))[5:])
            return rows
        except BaseException:
            for proc, _ in procs.values():
                if proc.poll() is None:
                    proc.kill()
            for side, (proc, _) in procs.items():
                print(f"{side}: {proc.communicate()[1][-2000:]}", file=sys.stderr)
            raise


def compare_with_rev(name: str, tree: Path, rev: str, ckpt: Path, data: Path, steps: int, skip: int, tp: int,
                     repeats: int) -> None:
    """`repeats` lockstep runs of old (capture off) / new (capture off) / new (capture on); pooled medians."""
    runs = [lockstep(tree, ckpt, data, steps, tp) for _ in range(repeats)]
    pooled = {side: [r for run in runs for r in run[side][skip:]] for side in SIDES}
    label = {("old", "off"): f"{rev} off", ("new", "off"): "new, off", ("new", "on"): "new, on"}
    print(f"\n{name}: the code at {rev} with capture off vs this tree with capture off and on; {repeats} run(s) of "
          f"{steps} steps, the three interleaved step by step; medians of {len(pooled[SIDES[0]])} steps per side "
          f"(first {skip} of each run dropped)")
    print(f"{'phase (s)':<16}" + "".join(f"{label[s]:>16}" for s in SIDES) + f"{'new on/old off':>16}"
          + f"{'new on/new off':>16}")
    for key in PHASES:
        med = [statistics.median(r[key] for r in pooled[s]) for s in SIDES]
        ratios = [f"{med[2] / m:.2f}" if m > 0 else "-" for m in (med[0], med[1])]
        print(f"{key.removeprefix('time_'):<16}" + "".join(f"{m:>16.3f}" for m in med) + "".join(f"{r:>16}" for r in ratios))
    print("reward_total per step (run 1):")
    for side in SIDES:
        print(f"  {label[side]:<14}" + " ".join(f"{r['reward_total']:.4f}" for r in runs[0][side]))
    print(f"{'mean over runs':<16}" + "".join(f"{label[s]:>16}" for s in SIDES))
    for key in REWARDS:
        means = [sum(r[key] for run in runs for r in run[s]) / sum(len(run[s]) for run in runs) for s in SIDES]
        print(f"{key:<16}" + "".join(f"{m:>16.4f}" for m in means))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("demo", "57m", "both"), default="both")
    p.add_argument("--steps", type=int, default=8, help="steps per mode")
    p.add_argument("--skip", type=int, default=1, help="first steps per mode left out of the medians")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_grpo_step",
                   help="where the benchmark checkpoints and data are made (reused when present)")
    p.add_argument("--baseline-rev", help="compare this tree (capture on) with the code at this git revision "
                                          "(capture off) instead of capture on/off on this tree")
    p.add_argument("--repeats", type=int, default=1, help="lockstep runs with --baseline-rev")
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
