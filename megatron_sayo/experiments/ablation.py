"""The paper's Table 2 on CPU: GRPO with attention + format (`attention`), accuracy + format (`accuracy`) and all
three rewards (`full`), docs/spec.md §3-4, per toy task and seed, from one shared warm-up per toy.

    python -m megatron_sayo.experiments.ablation --out DIR [--toys tiles,tiles_reasoning] [--arms a,b,...]
        [--arm NAME=BASE:key=value,...] [--seeds 0,1,2] [--jobs 2] [key=value ...]

Every arm of a toy uses the same config (megatron_sayo/configs/tiny.yaml + SETTINGS + the toy's TOYS settings +
the overrides given), the same warm-up, data, steps, learning rate, seed and sampling; arms differ ONLY in their
ARMS overrides (the reward weights) and, for arms made with --arm, in the method-variant keys of VARIANT_KEYS
(e.g. --arm attention_answer=attention:reward.token_selection=answer). Each arm is one single-process training
run (TP=1) in DIR/<toy>/runs/<arm>-seed<S>/, `--jobs` at a time, so step times are measured under one load.
Held-out figures come from the trainer's evaluation (rl/heldout.py): start = before the first GRPO step, end =
after the last. Writes DIR/<toy>/results.json, summary.md and ablation.png per toy, DIR/summary.md (a
Table-2-shaped table per toy) and DIR/ablation.png (every toy and arm). A finished run is reused when the
command is run again; an unfinished one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from megatron_sayo.config import ConfigError, load_config, parse_override

CONFIG = files("megatron_sayo") / "configs" / "tiny.yaml"

# Table 2's rows: the reward weights of each arm (the one difference between the arms), in the paper's order.
ARMS: dict[str, tuple[str, ...]] = {
    "attention": ("reward.weights.attention=1.0", "reward.weights.format=1.0", "reward.weights.accuracy=0.0"),
    "accuracy": ("reward.weights.attention=0.0", "reward.weights.format=1.0", "reward.weights.accuracy=1.0"),
    "full": ("reward.weights.attention=1.0", "reward.weights.format=1.0", "reward.weights.accuracy=1.0"),
}
TABLE2 = {"attention": "w/ Attn. Reward", "accuracy": "w/ Acc. Reward", "full": "Full (Attn. + Acc.)"}

# The settings an arm made with --arm may change (a method variant); anything else is shared by all arms.
VARIANT_KEYS = ("reward.weights.attention", "reward.weights.format", "reward.weights.accuracy",
                "reward.token_selection", "reward.top_entropy_ratio", "reward.attention_form", "reward.attention_row",
                "loss.clip_eps", "loss.clip_eps_high", "rollout.dynamic_sampling",
                "rollout.dynamic_sampling_max_batches")

# Per toy task (data/synthetic.py), its own settings with the reason for each.
TOYS: dict[str, tuple[tuple[str, str], ...]] = {
    "tiles": (
        ("data.synthetic_task=tiles", "the task a tiny model learns to read: 'what is under red?' is a lookup inside "
                                      "one visual token (data/synthetic.py). On the shapes task the same warm-up "
                                      "taught the format but not the task (held-out accuracy 0.20, below the 0.27 "
                                      "of the commonest answer), so the comparison could not test looking"),
        ("data.synthetic_n=1024", "1024 training images (held-out: 128 from another seed, made beside them)"),
        ("warmup.steps=400", "supervised warm-up on the answers, 400 steps x 32 answers: the answer NLL of "
                             "exploration runs stays at ~0.16 per token (chance on the colour) until the lookup is "
                             "learned, then falls to 0.03-0.04 by step 400 and to ~0.01 by 1500; 400 leaves the "
                             "policy reading the region part of the time, so GRPO has errors to remove, the same for "
                             "every arm"),
        ("rollout.max_new_tokens=24", "a tagged answer is 17-20 tokens of the tiny tokenizer, end token included"),
    ),
    "tiles_reasoning": (
        ("data.synthetic_task=tiles_reasoning", "each warm-up target first describes one tile, the asked one a third "
                                                "of the time: which tile a completion describes is the policy's "
                                                "choice, so a reward on attention has something to act on"),
        ("data.synthetic_n=4096", "a 2500-step warm-up would see 1024 images 78 times"),
        ("warmup.steps=2500", "the answer NLL sits at ~0.13-0.16 (the colour at chance) until the lookup is learned, "
                              "which happened between steps 1500 and 2000 with this warmup.seed (held-out accuracy "
                              "0.53 at 1500, 0.95 at 2000, 0.94 at 2500) and before step 1000 with warmup.seed=1 "
                              "(1.0 at 1000, 2000 and 2500): 2500 leaves margin; ~8 minutes on 2 quiet cores, data "
                              "parallel over --jobs ranks"),
        ("rollout.max_new_tokens=40", "a described tile plus the tagged answer is about 30-36 tokens"),
        ("reward.format_long_bound=40", "the format reward's long bound at the completion length"),
    ),
}

# Settings shared by every toy and arm (on top of tiny.yaml), each with the reason it was chosen. None was tuned on
# the held-out set: they were fixed from the training-side signals named in the reasons and the time budget.
SETTINGS: tuple[tuple[str, str], ...] = (
    ("parallel.tp=1", "one process per arm, so two arms run side by side on two cores"),
    ("rollout.group_size=8", "8 completions per prompt: a within-group spread for the rewards to act on"),
    ("train.steps=100", "GRPO steps per arm (learning rate: tiny.yaml's 1e-4; at it an exploration run's training "
                        "accuracy rose 0.65 -> 0.85 in 60 steps), what the time budget allows"),
    ("train.global_batch=4", "4 prompts x 8 completions = 32 completions per step"),
    ("train.micro_batch=16", "two forward/backward chunks per step"),
    ("checkpoint.interval=0", "a checkpoint only at the end (resume after an interruption restarts the arm)"),
    ("eval.interval=10", "held-out evaluation every 10 steps and before the first"),
    ("eval.num_samples=64", "64 held-out questions per evaluation"),
    ("eval.decoding=greedy", "deterministic held-out answers: differences between evaluations are the policy's"),
    ("log.tensorboard=false", "metrics.jsonl is what the ablation reads"),
    ("rollout.capture_scores=false", "a teacher-forced scoring pass, so the report can time the mass probe in it "
                                     "against the reference pass without it"),
)

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def variant_key(key: str) -> bool:
    return key in VARIANT_KEYS


def parse_arm(text: str, arms: dict[str, tuple[str, ...]]) -> tuple[str, tuple[str, ...]]:
    """'NAME=BASE:key=value,key=value' -> (NAME, BASE's overrides + these), each key checked against VARIANT_KEYS
    (values are checked when the arm's config is loaded)."""
    name, sep, rest = text.partition("=")
    base, sep2, spec = rest.partition(":")
    if not sep or not _NAME.fullmatch(name) or base not in arms:
        raise ConfigError(f"--arm {text!r}: expected NAME=BASE:key=value,... with NAME of [a-z0-9_.-] and BASE one "
                          f"of {', '.join(arms)}")
    if name in arms:
        raise ConfigError(f"--arm {text!r}: an arm named {name!r} exists already")
    extra = tuple(item for item in spec.split(",") if item.strip()) if sep2 else ()
    for item in extra:
        key, _ = parse_override(item)
        if not variant_key(key):
            raise ConfigError(f"--arm {name}: {key} is not a method-variant setting; an arm may set "
                              f"{', '.join(VARIANT_KEYS)}")
    return name, (*arms[base], *extra)


def shared_overrides(out: Path, toy: str) -> list[str]:
    """Overrides common to every arm and seed of a toy: SETTINGS, the toy's, where the data and warm-ups live."""
    return ([key for key, _ in SETTINGS] + [key for key, _ in TOYS[toy]]
            + [f"data.synthetic_dir={out / 'data'}", f"warmup.cache_dir={out / 'warmup'}"])


def warmup_checkpoint(cfg) -> Path:
    """The shared warm-up checkpoint of an ablation run with config `cfg` (rl/warmup.py keys it by its settings)."""
    from megatron_sayo.rl.warmup import warmup_dir

    return warmup_dir(cfg, cfg.model.hf_path)


def check_overrides(extra: list[str]) -> None:
    """User overrides apply to every arm, so they may not touch what defines an arm, a toy or a run."""
    for text in extra:
        key, _ = parse_override(text)
        if key.startswith("reward.weights") or key in ("train.seed", "run_dir"):
            raise ConfigError(f"command line: {key} is set per arm by the ablation (ARMS, --arm, --seeds, --out)")
        if key == "data.synthetic_task":
            raise ConfigError(f"command line: {key} is set per toy by the ablation (--toys {','.join(TOYS)})")


def toy_of(overrides: list[str], default: str = "tiles") -> str:
    """The toy a tool's overrides name with data.synthetic_task (when it is one of TOYS), else `default`."""
    for text in overrides:
        key, value = parse_override(text)
        if key == "data.synthetic_task" and value in TOYS:
            default = value
    return default


def run_dir(out: Path, arm: str, seed: int) -> Path:
    """A run's folder under a toy's folder `out`."""
    return out / "runs" / f"{arm}-seed{seed}"


def arm_overrides(out: Path, toy: str, arm: tuple[str, ...], name: str, seed: int, extra: list[str]) -> list[str]:
    """Everything one run gets: the shared and toy settings, the user's overrides, the arm's, seed, run_dir."""
    return [*shared_overrides(out, toy), *extra, *arm, f"train.seed={seed}",
            f"run_dir={run_dir(out / toy, name, seed)}"]


# ------------------------------------------------------------------------------------------------ running

def warmup_ranks(cfg, jobs: int) -> int:
    """Data-parallel ranks for the shared warm-up: the most of `jobs` (one per core) the config's batches split over."""
    for ranks in range(max(1, jobs), 1, -1):
        try:
            cfg.validate_world(ranks)
            return ranks
        except ConfigError:
            continue
    return 1


def _warmup_worker(overrides: list[str]) -> None:
    """Make the data and the shared warm-up checkpoint (data parallel over the spawned ranks, one thread each),
    before any arm starts."""
    from megatron_sayo import console

    cfg = load_config(str(CONFIG), overrides)
    console.setup(cfg.log.level)     # before megatron is imported: its known warnings stay off the console
    import torch

    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.warmup import warmed_up
    from megatron_sayo.train import check_before_launch, prepare_assets

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1 if world > 1 else torch.get_num_threads())
    hf_dir = check_before_launch(cfg, world)
    if int(os.environ["RANK"]) == 0:
        prepare_assets(cfg)    # the other ranks wait for it in the process group's rendezvous and barrier
    runtime.init_distributed(1, 1)
    torch.distributed.barrier()
    runtime.seed_everything(cfg.train.seed)
    warmed_up(cfg, hf_dir, load_grounded(cfg.data.train_file, on_error=cfg.data.on_error))


def finished(run: Path, steps: int) -> bool:
    """A run whose metrics reach its last step (with its final evaluation)."""
    rows = read_rows(run)
    return any(r.get("step") == steps and "eval_tas" in r for r in rows)


def read_rows(run: Path) -> list[dict]:
    from megatron_sayo.rl.plots import read_metrics

    try:
        return read_metrics(run / "metrics.jsonl")
    except (FileNotFoundError, ValueError):
        return []


def run_arms(out: Path, toy: str, arms: dict[str, tuple[str, ...]], seeds: list[int], extra: list[str], jobs: int,
             steps: int) -> None:
    """Train every (seed, arm) of a toy not finished yet, `jobs` at a time, seed by seed; stop at the first
    failure."""
    from megatron_sayo.distributed.runtime import free_port

    todo = [(arm, seed) for seed in seeds for arm in arms if not finished(run_dir(out / toy, arm, seed), steps)]
    running: list[tuple[str, int, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < jobs:
            arm, seed = todo.pop(0)
            run = run_dir(out / toy, arm, seed)
            run.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "megatron_sayo.train", "--config", str(CONFIG),
                   *arm_overrides(out, toy, arms[arm], arm, seed, extra)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
            log = open(run / "train.log", "a")
            print(f"start {toy} {arm} seed {seed}: log {run / 'train.log'}", flush=True)
            running.append((arm, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
            log.close()
        time.sleep(1.0)
        for item in list(running):
            arm, seed, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                for _, _, other in running:
                    other.terminate()
                raise RuntimeError(f"{toy} {arm} seed {seed} failed (exit {proc.returncode}): see "
                                   f"{run_dir(out / toy, arm, seed) / 'train.log'}")
            print(f"done  {toy} {arm} seed {seed}", flush=True)


# ------------------------------------------------------------------------------------------------ results

# Training-side metrics (rl/diagnostics.py) that say whether a reward could steer the policy.
DIAGNOSTICS = ("attention_group_std", "accuracy_group_std", "adv_tas_corr", "acc_tas_corr")

def arm_result(rows: list[dict]) -> dict:
    """Held-out start/end figures, the evaluation curve, step time and training-side diagnostics of one run."""
    evals = [r for r in rows if "eval_tas" in r]
    steps = [r for r in rows if "reward_total" in r]
    if not evals or not steps:
        raise ValueError("a run without held-out evaluations or training steps")
    first, last = evals[0], evals[-1]
    out = {}
    for name, key in (("tas", "eval_tas"), ("accuracy", "eval_accuracy"), ("format", "eval_format"),
                      ("reward_attention", "eval_reward_attention")):
        out[f"{name}_start"], out[f"{name}_end"] = float(first[key]), float(last[key])
    out["start_step"], out["end_step"] = int(first["step"]), int(last["step"])
    out["curve"] = {"step": [int(r["step"]) for r in evals]}
    for name, key in (("tas", "eval_tas"), ("accuracy", "eval_accuracy"), ("format", "eval_format"),
                      ("reward_attention", "eval_reward_attention")):
        out["curve"][name] = [float(r[key]) for r in evals]
    out["step_time_s"] = statistics.median(float(r["time_step"]) for r in steps)
    for phase in ("rollout", "score", "reference"):
        out[f"time_{phase}_s"] = statistics.median(float(r.get(f"time_{phase}", "nan")) for r in steps)
    for key in DIAGNOSTICS + ("tas", "reward_accuracy", "reward_attention"):
        values = [float(r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        if values:
            out[f"train_{key}_mean"] = statistics.fmean(values)
    return out


def collect(out: Path, arms: list[str], seeds: list[int], config: dict) -> dict:
    """A toy's results.json content from its runs' metrics (`out` the toy's folder)."""
    per_arm = {arm: {str(seed): arm_result(read_rows(run_dir(out, arm, seed))) for seed in seeds} for arm in arms}
    return {"arms": per_arm, "config": config}


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_sd(per_seed: dict, seeds: list[str], key: str) -> str:
    m, sd = spread([per_seed[s][key] for s in seeds])
    return f"{m:.4f} ± {sd:.4f}"


def summary_markdown(results: dict, toy: str = "") -> str:
    """One toy: mean and spread per arm, every seed, the step-time cost and, against the accuracy arm, the goal
    check of the issue (TAS above it without lower accuracy)."""
    arms = results["arms"]
    seeds = sorted(next(iter(arms.values())), key=int)
    cols = ("tas_start", "tas_end", "accuracy_start", "accuracy_end", "format_end", "reward_attention_end")
    lines = [f"# Ablation{' on ' + toy if toy else ''}: {', '.join(arms)}", "",
             f"Held-out set: {results['config'].get('eval_samples', '?')} questions, greedy decoding; "
             f"start = before the first GRPO step, end = after the last. Mean ± sample std over "
             f"{len(seeds)} seeds.", "",
             "| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for arm, per_seed in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_mean_sd(per_seed, seeds, c) for c in cols) + " |")
    lines += ["", "Per seed:", "", "| arm | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, per_seed in arms.items():
        for s in seeds:
            lines.append(f"| {arm} | {s} | " + " | ".join(f"{per_seed[s][c]:.4f}" for c in cols) + " |")
    names = list(arms)
    t_first = statistics.fmean(arms[names[0]][s]["step_time_s"] for s in seeds)
    capture = results["config"].get("shared", {}).get("rollout", {}).get("capture_scores")
    where = ("taken while decoding (rollout.capture_scores: no separate scoring pass)" if capture else
             "computed in the scoring pass" if capture is False else "computed in the rollout or the scoring pass")
    lines += ["", "## Step time", "",
              f"Median seconds per GRPO step (mean over seeds), arms running `--jobs` at a time; every arm computes "
              f"the region masses (its TAS is logged), {where}. The reference pass is the same batch through the "
              f"frozen model without masses:", "",
              f"| arm | step | / {names[0]} | rollout | scoring | reference |", "|---|---|---|---|---|---|"]
    for arm, per_seed in arms.items():
        cells = [statistics.fmean(per_seed[s][k] for s in seeds)
                 for k in ("step_time_s", "time_rollout_s", "time_score_s", "time_reference_s")]
        lines.append(f"| {arm} | {cells[0]:.3f} | {cells[0] / t_first:.3f} | "
                     + " | ".join(f"{c:.3f}" for c in cells[1:]) + " |")
    if "accuracy" in arms:
        base = arms["accuracy"]
        lines += ["", "## Goal check (against the accuracy arm, per seed)", ""]
        for arm, per_seed in arms.items():
            if arm == "accuracy":
                continue
            above = sum(per_seed[s]["tas_end"] > base[s]["tas_end"] for s in seeds)
            up = sum(per_seed[s]["tas_end"] > per_seed[s]["tas_start"] for s in seeds)
            acc_ok = sum(per_seed[s]["accuracy_end"] >= base[s]["accuracy_end"] for s in seeds)
            lines.append(f"- {arm}: held-out TAS at the end above the accuracy arm's: {above}/{len(seeds)} seeds; "
                         f"above its own start: {up}/{len(seeds)}; accuracy at the end not below the accuracy "
                         f"arm's: {acc_ok}/{len(seeds)}")
    first = arms[names[0]][seeds[0]]
    diag = [f"train_{k}_mean" for k in DIAGNOSTICS if f"train_{k}_mean" in first]
    if diag:
        lines += ["", "## Why (training-side diagnostics, mean over steps)", "", "| arm | seed | " + " | ".join(diag)
                  + " |", "|---|---|" + "---|" * len(diag)]
        for arm, per_seed in arms.items():
            for s in seeds:
                lines.append(f"| {arm} | {s} | " + " | ".join(f"{per_seed[s].get(k, float('nan')):.4f}"
                                                              for k in diag) + " |")
    wall, warm = results["config"].get("wall_time_s"), results["config"].get("warmup_time_s")
    if wall is not None:
        lines += ["", f"Wall time of this toy: {wall:.0f} s"
                  + (f" (data and shared warm-up {warm:.0f} s, made once and cached)." if warm is not None else ".")]
    return "\n".join(lines) + "\n"


def arm_weights(overrides: tuple[str, ...] | list[str]) -> dict[str, float]:
    """The reward weights an arm's overrides set (RewardWeights' defaults for the others)."""
    from megatron_sayo.config import RewardWeights

    weights = dict(vars(RewardWeights()))
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("reward.weights."):
            weights[key.rsplit(".", 1)[1]] = float(value)
    return weights


def table2_markdown(by_toy: dict[str, dict]) -> str:
    """DIR/summary.md: per toy, the paper's Table 2 shape (one row per arm, which rewards it trains with) with
    held-out TAS, accuracy, format and attention reward at the end (start -> end for TAS and accuracy)."""
    lines = ["# Reward ablation (the paper's Table 2 on the CPU toys)", "",
             "Held-out means ± sample std over seeds, greedy decoding; start -> end = before the first and after the "
             "last GRPO step. Per toy details: DIR/<toy>/summary.md.", ""]
    for toy, results in by_toy.items():
        arms, overrides = results["arms"], results["config"].get("arm_overrides", {})
        seeds = sorted(next(iter(arms.values())), key=int)
        warm = results["config"].get("warmup_time_s")
        lines += [f"## {toy}", "", f"{len(seeds)} seeds ({', '.join(seeds)}), "
                  f"{results['config'].get('eval_samples', '?')} held-out questions; the shared warm-up's held-out "
                  "accuracy is the start column" + (f" (data and warm-up: {warm:.0f} s)." if warm is not None
                                                    else "."),
                  "",
                  "| row | Attn. | Acc. | Format | TAS start -> end | accuracy start -> end | format end | "
                  "attention reward end |", "|---|---|---|---|---|---|---|---|"]
        for arm, per_seed in arms.items():
            w = arm_weights(overrides.get(arm, ARMS.get(arm, ())))
            marks = " | ".join("✓" if w[k] else "" for k in ("attention", "accuracy", "format"))
            extra = [o for o in overrides.get(arm, ()) if not o.startswith("reward.weights.")]
            label = TABLE2.get(arm, arm) + (f" ({', '.join(extra)})" if extra else "")
            cells = [f"{_mean_sd(per_seed, seeds, k + '_start')} -> {_mean_sd(per_seed, seeds, k + '_end')}"
                     for k in ("tas", "accuracy")]
            cells += [_mean_sd(per_seed, seeds, "format_end"), _mean_sd(per_seed, seeds, "reward_attention_end")]
            lines.append(f"| {label} | {marks} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _draw_arms(results: dict, axes) -> None:
    """Held-out TAS and accuracy against step on two axes: one colour per arm, one line style per seed."""
    styles = ("-", "--", ":", "-.")
    for n, (arm, per_seed) in enumerate(results["arms"].items()):
        for i, (seed, res) in enumerate(sorted(per_seed.items(), key=lambda kv: int(kv[0]))):
            for ax, key in zip(axes, ("tas", "accuracy")):
                ax.plot(res["curve"]["step"], res["curve"][key], color=f"C{n % 10}",
                        linestyle=styles[i % len(styles)], marker="o", markersize=3,
                        label=f"{arm} seed {seed}")
    for ax, title in zip(axes, ("held-out TAS (pooled a / v)", "held-out accuracy")):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(True, alpha=0.3)
    axes[0].axhline(1.0, color="grey", linewidth=1, linestyle="--")
    axes[1].legend(fontsize=7, loc="best")


def plot(by_toy: dict[str, dict], path: Path) -> None:
    """One row of (TAS, accuracy) axes per toy, every arm and seed on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(by_toy), 2, figsize=(11, 4.2 * len(by_toy)), squeeze=False)
    for row, (toy, results) in zip(axes, by_toy.items()):
        _draw_arms(results, row)
        for ax in row:
            ax.set_title(f"{toy}: {ax.get_title()}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(out: Path, by_toy: dict[str, dict]) -> None:
    """Per toy DIR/<toy>/results.json, summary.md, ablation.png; DIR/summary.md and DIR/ablation.png; atomic."""
    from megatron_sayo.checkpoint.files import write_text_atomic

    for toy, results in by_toy.items():
        (out / toy).mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / toy / "results.json", json.dumps(results, indent=1) + "\n")
        write_text_atomic(out / toy / "summary.md", summary_markdown(results, toy))
        plot({toy: results}, out / toy / "ablation.png")
    write_text_atomic(out / "summary.md", table2_markdown(by_toy))
    plot(by_toy, out / "ablation.png")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def parse_names(text: str, flag: str, valid) -> list[str]:
    """Comma-separated distinct names, each one of `valid`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"{flag} {text!r}: expected distinct names from {', '.join(valid)}")
    return names


def plan(args) -> tuple[dict[str, tuple[str, ...]], list[str], list[str], dict]:
    """(every arm's overrides, the arms and toys to run, each (toy, arm)'s config of the first seed), all checked
    before anything runs."""
    arms = dict(ARMS)
    for text in args.arm:
        name, overrides = parse_arm(text, arms)
        arms[name] = overrides
    chosen = parse_names(args.arms, "--arms", arms) if args.arms else list(ARMS)
    toys = parse_names(args.toys, "--toys", TOYS)
    check_overrides(args.overrides)
    cfgs = {(toy, arm): load_config(str(CONFIG), arm_overrides(args.out, toy, arms[arm], arm, args.seeds[0],
                                                               args.overrides))
            for toy in toys for arm in arms}     # every arm defined is checked, chosen or not
    return arms, chosen, toys, cfgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_sayo.experiments.ablation",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", required=True, type=Path, help="output folder (runs, data, warm-ups, results)")
    p.add_argument("--toys", default=",".join(TOYS), help=f"comma-separated toy tasks (default {','.join(TOYS)})")
    p.add_argument("--arms", default="", help=f"comma-separated arms to run (default {','.join(ARMS)}; names made "
                                              f"with --arm too)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=BASE:key=value,...",
                   help=f"define an arm: a base arm plus method-variant overrides ({', '.join(VARIANT_KEYS)})")
    p.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="comma-separated GRPO seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every arm and toy (not reward.weights, "
                                                "data.synthetic_task, seed, run_dir)")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    out = args.out
    try:
        arms, chosen, toys, cfgs = plan(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    from megatron_sayo.distributed.runtime import spawn_local

    by_toy = {}
    for toy in toys:
        t0 = time.perf_counter()
        print(f"{toy}: data and shared warm-up ...", flush=True)
        # no time limit: a long warm-up (warmup.steps) on a slow machine is the user's choice, like the arms' runs
        ranks = warmup_ranks(cfgs[(toy, chosen[0])], args.jobs)
        spawn_local(_warmup_worker, ranks,
                    arm_overrides(out, toy, arms[chosen[0]], chosen[0], args.seeds[0], args.overrides),
                    timeout_s=float("inf"))
        warmup_s = time.perf_counter() - t0
        steps = cfgs[(toy, chosen[0])].train.steps
        run_arms(out, toy, {a: arms[a] for a in chosen}, args.seeds, args.overrides, max(1, args.jobs), steps)
        base = cfgs[(toy, chosen[0])].to_dict()
        config = {"shared": base, "toy": toy, "arms": chosen, "arm_overrides": {a: list(arms[a]) for a in chosen},
                  "seeds": args.seeds, "settings": dict(SETTINGS), "toy_settings": dict(TOYS[toy]),
                  "overrides": args.overrides, "eval_samples": base["eval"]["num_samples"],
                  "wall_time_s": time.perf_counter() - t0, "warmup_time_s": warmup_s, "warmup_ranks": ranks}
        by_toy[toy] = collect(out / toy, chosen, args.seeds, config)
    write_outputs(out, by_toy)
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'summary.md'}, {out / 'ablation.png'} and per toy results.json, summary.md, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
