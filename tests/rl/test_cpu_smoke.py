"""Every example config in examples/ runs shrunk on CPU (issue 26 item 3): `torchrun --nproc-per-node 4 -m
megatron_sayo.train --config EXAMPLE --cpu-smoke` on the tiny model and a 16-sample synthetic set, 6 steps with a
checkpoint at step 3, then a second start from that checkpoint continues to step 6 exactly as the uninterrupted
run did. So each example's own combination (bf16 parameters with fp32 main weights, the distributed optimizer
over gloo, selective recompute, the frozen tower at PP=2, LoRA at TP x PP in bf16) trains, checkpoints and resumes
through the trainer.

The stop at step 3 is the checkpoint the 6-step run writes there (the trainer's one save(), at an interval as at
the end of a 3-step run), copied with the first 3 metrics rows into a fresh run dir: two starts per example
instead of three (a 3-step run, its resume and the uninterrupted run), to keep the four examples within the
suite's budget; tests/rl/test_train.py stops a run itself and resumes it in the same dir.

What the shrunk runs override besides the tiny model and data files, and why (--cpu-smoke itself changes only
TP/PP and the GPU kernels, and prints each change): train.steps and checkpoint.interval (3 + 3 steps), and the
rollout's size, train.global_batch=4 prompts (8 for qwen25vl_7b_lora: DP=4 x micro-batch 4 completions) x
rollout.group_size=2 completions of rollout.max_new_tokens=6 tokens: the examples' 16 x 16 x 110 takes minutes a
step on 2 cores. Every other setting is the file's."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
GROUP, NEW_TOKENS, PROCESSES = 2, 6, 4
VOLATILE = ("time_", "tokens_per_s")
# what --cpu-smoke may change (train.cpu_smoke_changes): the layout and the GPU kernels
SMOKE_KEYS = {"parallel.tp", "parallel.pp", "model.attention_backend", "model.layer_backend"}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from megatron_sayo.train import write_synthetic

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_synthetic(path, 16, seed=0)
    return path


def shrink(example) -> list[str]:
    """The rollout's size for the shrunk run: G=2 completions of 6 tokens, and the fewest prompts (at least 4)
    that split over the example's DP at 4 processes into whole micro-batches of the file's train.micro_batch."""
    from megatron_sayo.config import load_config

    cfg = load_config(str(ROOT / "examples" / example))
    dp = PROCESSES // (min(cfg.parallel.tp, 2) * min(cfg.parallel.pp, 2))
    prompts = 4
    while prompts % dp or (prompts * GROUP) % (dp * cfg.train.micro_batch):
        prompts += 1
    return [f"train.global_batch={prompts}", f"rollout.group_size={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
            "checkpoint.interval=3"]


def overrides(example, ckpt, train_file, run_dir, steps):
    return [f"model.hf_path={ckpt}", f"data.train_file={train_file}", f"data.eval_file={train_file}",
            f"run_dir={run_dir}", f"train.steps={steps}", *shrink(example)]


def smoke_run(example, args):
    """One 4-process start of the example under --cpu-smoke; (stdout, wall seconds, CPU seconds of its processes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
           "-m", "megatron_sayo.train", "--config", str(ROOT / "examples" / example), "--cpu-smoke", *args]
    start, cpu = time.monotonic(), _children_cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout, time.monotonic() - start, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs_shrunk_on_cpu_and_resumes_exactly(example, tiny_ckpt, train_file, tmp_path, capsys):
    from megatron_sayo.config import load_config

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out, seconds, cpu = smoke_run(example, overrides(example, tiny_ckpt, train_file, straight, 6))

    # --cpu-smoke printed every change it made and changed nothing else: the run's config against the file's own
    # (the plain loader, same overrides), key by key
    printed = {line.split("=")[0] for line in re.findall(r"^cpu-smoke: (\S+=\S+) \(was", out, re.M)}
    plain = flat(load_config(str(ROOT / "examples" / example), overrides(example, tiny_ckpt, train_file, straight, 6))
                 .to_dict())
    ran = flat(yaml.safe_load((straight / "config.yaml").read_text()))
    changed = {key for key in plain if plain[key] != ran[key]}
    assert changed == printed and changed <= SMOKE_KEYS, (changed, printed)
    assert ran["parallel.tp"] <= 2 and ran["parallel.pp"] <= 2

    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 for r in rows) and rows[-1]["kl"] > 0, "the updates must move the policy"
    ckpt = straight / "checkpoints" / "step_0000003"
    meta = json.loads((ckpt / "checkpoint_metadata.json").read_text())
    assert meta["dtype"] == ran["model.params_dtype"] and meta["optimizer"] == "megatron", meta

    # a second start from the step-3 checkpoint continues to step 6 as the uninterrupted run did
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    (resumed / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    out2, seconds2, cpu2 = smoke_run(example, overrides(example, tiny_ckpt, train_file, resumed, 6))
    assert re.search(r"resumed from \S*step_0000003 at step 3", out2), out2[-2000:]
    again = metrics(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert [stable(r) for r in again] == [stable(r) for r in rows]
    with capsys.disabled():
        print(f"\n{example}: 6 steps {seconds:.0f} s ({cpu:.0f} s CPU), resume to step 6 {seconds2:.0f} s "
              f"({cpu2:.0f} s CPU)")
