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
                     "data.eval_file=null", "data.synthetic_n=0", "eval.interval=0", "warmup.steps=0",
                     "log.tensorboard=false",
                     "checkpoint.interval=0", f"train.steps={steps}", f"parallel.tp={tp}"]
        results = spawn_local(_rank, tp, overrides, run_dir, steps, modes, baton, timeout_s=3600)
    return next(r for r in results if r is not None)


def run(name: str, ckpt: Path, data: Path, steps: int, skip: int, tp: int) -> None:
    report(name, run_modes(ckpt, data, steps, tp, ("off", "on")), skip)


# ---------------------------------------------------------------------------------------------- --model sayo

SAYO_G, SAYO_SIDE = 8, 868          # 868 px -> 31 x 31 merged patches = 961 image tokens (+ ~40 text tokens)


def _saved_bytes(params) -> tuple[object, dict]:
    """A saved_tensors_hooks context counting the distinct storages autograd keeps for backward (parameters
    excluded): the update's activation memory at its peak, the end of the forward (one micro-batch)."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def _sayo_batch(ckpt: Path, hf, seed: int = 0):
    """One prompt (an 868 px image, ~1,000 tokens, mostly image) and G = 8 completions of 56..110 tokens."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_sayo.data.processor import Processor
    from megatron_sayo.rl.batch import ScoringBatch

    proc = Processor.from_pretrained(ckpt, min_pixels=SAYO_SIDE ** 2, max_pixels=SAYO_SIDE ** 2)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (SAYO_SIDE, SAYO_SIDE, 3), dtype=np.uint8), "RGB")
    inputs = proc([[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text":
                   "Which object is left of the red box? Think briefly, then answer in <answer></answer>."}]}]])
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(56, 111, (SAYO_G,), generator=g)
    lengths[0] = 110
    T = int(lengths.max())
    comp = torch.randint(10, 30000, (SAYO_G, T), generator=g)
    cmask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = inputs["input_ids"]
    P = ids.shape[1]
    region = torch.zeros(SAYO_G, P + T, dtype=torch.bool)
    region[:, :P] = (ids[0] == hf.tokens.image) & (torch.rand(P, generator=g) < 0.2)
    pix, thw = inputs["pixel_values"], inputs["image_grid_thw"]
    batch = ScoringBatch(torch.cat([ids.repeat(SAYO_G, 1), comp * cmask], 1),
                         torch.cat([inputs["attention_mask"].repeat(SAYO_G, 1), cmask], 1), P, cmask,
                         [pix] * SAYO_G, [thw] * SAYO_G, region)
    return batch, dict(old=-torch.rand(SAYO_G, T, generator=g) * 3, adv=torch.randn(SAYO_G, generator=g))


def _sayo_rank(ckpt: str, repeats: int) -> dict | None:
    """On 2 ranks (TP=2): per mode (unshared, shared), interleaved, the seconds of the scoring, reference and
    update passes of one SAYO-shaped group, the update's saved activation bytes, and once the rollout."""
    from megatron.core import parallel_state

    from megatron_sayo.distributed import runtime
    from megatron_sayo.inference.decode import generate
    from megatron_sayo.inference.sampling import SamplingParams
    from megatron_sayo.rl.loss import grpo_token_loss
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.phase_timer import PhaseTimer
    from megatron_sayo.rl.scoring import reference_logprobs, score_policy
    from megatron_sayo.rl.trainer import build_policy
    from megatron_sayo.rl.update import accumulate_gradients
    from megatron_sayo.testing.fixed_rollout import update_config

    runtime.init_distributed(2, 1)
    cfg = update_config(ckpt, 2, 1, train={"micro_batch": SAYO_G})
    policy = build_policy(cfg, ckpt)
    reference = build_policy(cfg, ckpt).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    ddp, optimizer, _ = wrap_for_training(policy, cfg.optim, cfg.train.steps)
    batch, made = _sayo_batch(Path(ckpt), policy.hf)
    T = batch.completion_mask.shape[1]
    ref0 = reference_logprobs(reference, batch, SAYO_G, 1.0)
    loss = grpo_token_loss(made["old"], ref0, made["adv"], cfg.loss)
    rows = {"unshared": [], "shared": []}
    for r in range(repeats):
        for mode in (("unshared", "shared") if r % 2 == 0 else ("shared", "unshared")):
            shared = mode == "shared"
            timer = PhaseTimer()
            with timer.phase("score"):
                score_policy(policy, batch, SAYO_G, 1.0, shared=shared)
            with timer.phase("reference"):
                ref = reference_logprobs(reference, batch, SAYO_G, 1.0, shared=shared)
            with timer.phase("update"):
                hooks, seen = _saved_bytes(policy.parameters())
                with hooks:
                    reported = accumulate_gradients(ddp, optimizer, batch, SAYO_G, 1.0, loss, shared=shared)
            rows[mode].append({**timer.metrics(),
                               "update_saved_mib": sum(seen.values()) / 2**20,
                               "loss": float(sum(x["pg_loss"] + 0.05 * x["kl"] for x in reported)),
                               "ref_logp_sum": float(ref.sum())})
    policy.eval()
    start = time.perf_counter()
    inputs = {"input_ids": batch.sequences[:1, :batch.prompt_length],
              "attention_mask": batch.attention_mask[:1, :batch.prompt_length],
              "pixel_values": batch.pixel_values[0], "image_grid_thw": batch.image_grid_thw[0]}
    tok = policy.hf.tokens
    params = SamplingParams(temperature=1.0, max_new_tokens=T, seed=1,
                            suppress_token_ids=(tok.image, tok.video, tok.vision_start, tok.vision_end))
    generate(policy, inputs, params, num_return_sequences=SAYO_G)
    rollout_s = time.perf_counter() - start
    if parallel_state.get_tensor_model_parallel_rank():
        return None
    return {"rows": rows, "rollout": rollout_s, "prompt_tokens": batch.prompt_length,
            "image_tokens": int((batch.sequences[0] == policy.hf.tokens.image).sum()),
            "completion_tokens": batch.completion_mask.sum(1).tolist()}


def run_sayo(ckpt: Path, repeats: int) -> None:
    """The SAYO-shaped case (issue 30): prints medians per mode, the shared / unshared ratios, the whole step."""
    from megatron_sayo.distributed.runtime import spawn_local

    out = next(r for r in spawn_local(_sayo_rank, 2, str(ckpt), repeats, timeout_s=3600) if r is not None)
    rows = out["rows"]
    print(f"\nSAYO shape, 57M model, TP=2: prompt {out['prompt_tokens']} tokens ({out['image_tokens']} image), "
          f"G={SAYO_G} completions of {out['completion_tokens']} tokens, kl_beta 0.05; median of {repeats} "
          f"interleaved repeats")
    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in rows[m][0]} for m in rows}
    print(f"{'':<22}{'unshared':>10}{'shared':>10}{'ratio':>8}")
    for key in ("time_score", "time_reference", "time_update", "update_saved_mib"):
        u, s = med["unshared"][key], med["shared"][key]
        print(f"{key:<22}{u:>10.3f}{s:>10.3f}{s / u:>8.2f}")
    ru = med["unshared"]["time_reference"] + med["unshared"]["time_update"]
    rs = med["shared"]["time_reference"] + med["shared"]["time_update"]
    print(f"{'reference + update':<22}{ru:>10.3f}{rs:>10.3f}{rs / ru:>8.2f}")
    for capture, extra in (("on", 0.0), ("off", 1.0)):
        su = out["rollout"] + ru + extra * med["unshared"]["time_score"]
        ss = out["rollout"] + rs + extra * med["shared"]["time_score"]
        print(f"{'step, capture ' + capture:<22}{su:>10.3f}{ss:>10.3f}{ss / su:>8.2f}"
              f"   (rollout {out['rollout']:.2f} s)")
    print(f"loss unshared {med['unshared']['loss']:.6f} shared {med['shared']['loss']:.6f}; reference log-prob "
          f"sums {med['unshared']['ref_logp_sum']:.4f} / {med['shared']['ref_logp_sum']:.4f}")


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
                    _wait_for(baton / f"done_{i}", alive=lambda proc=proc: proc.poll() is None)
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
        print(f"{key.removeprefix('time_'):<16}" + "".join(f"{m:>16.3f}" for m in med)
              + "".join(f"{r:>16}" for r in ratios))
    print("reward_total per step (run 1):")
    for side in SIDES:
        print(f"  {label[side]:<14}" + " ".join(f"{r['reward_total']:.4f}" for r in runs[0][side]))
    print(f"{'mean over runs':<16}" + "".join(f"{label[s]:>16}" for s in SIDES))
    for key in REWARDS:
        means = [sum(r[key] for run in runs for r in run[s]) / sum(len(run[s]) for run in runs) for s in SIDES]
        print(f"{key:<16}" + "".join(f"{m:>16.4f}" for m in means))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("demo", "57m", "both", "sayo"), default="both",
                   help="sayo: the prompt-sharing case (issue 30), shared vs unshared passes")
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
    if args.model == "sayo":
        run_sayo(ensure_checkpoint(args.cache / "ckpt_57m"), args.steps)
        return 0
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
