"""The ablation command: its two arms differ only in the reward weights, user overrides cannot break that, and
results.json / summary.md / ablation.png come out with the issue's schema and numbers equal to numpy's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megatron_sayo.config import ConfigError, load_config
from megatron_sayo.experiments import ablation as A


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def arm_config(tmp_path, arm, seed, extra=()):
    return flat(load_config(str(A.CONFIG), A.arm_overrides(tmp_path, arm, seed, list(extra))).to_dict())


def test_arms_differ_only_in_reward_weights(tmp_path):
    extra = ["optim.lr=2e-4"]
    base, sayo = arm_config(tmp_path, "accuracy", 0, extra), arm_config(tmp_path, "sayo", 0, extra)
    differ = {k for k in base if base[k] != sayo[k]}
    assert differ == {"reward.weights.attention", "run_dir"}
    assert (base["reward.weights.attention"], sayo["reward.weights.attention"]) == (0.0, 1.0)
    assert base["reward.weights.accuracy"] == sayo["reward.weights.accuracy"] == 1.0
    assert base["optim.lr"] == sayo["optim.lr"] == 2e-4           # user overrides reach both arms
    other_seed = arm_config(tmp_path, "sayo", 1, extra)
    assert {k for k in sayo if sayo[k] != other_seed[k]} == {"train.seed", "run_dir"}
    # one warm-up for every arm and seed: its cache, data and seed do not depend on the arm or the GRPO seed
    assert base["warmup.cache_dir"] == other_seed["warmup.cache_dir"]
    assert base["warmup.seed"] == other_seed["warmup.seed"]


@pytest.mark.parametrize("bad", ["reward.weights.attention=0.5", "train.seed=3", "run_dir=/tmp/x"])
def test_overrides_that_define_an_arm_are_refused(bad):
    with pytest.raises(ConfigError, match="set per arm"):
        A.check_overrides(["train.steps=3", bad])


def _write_run(run, seed, arm, steps=4):
    """metrics.jsonl as the trainer writes it: an eval row at step 0, train rows, evals at 2 and 4."""
    run.mkdir(parents=True)
    rng = np.random.default_rng([seed, len(arm)])
    rows = []
    for step in range(0, steps + 1):
        row = {"step": step}
        if step:
            row.update(reward_total=1.0, time_step=float(rng.uniform(0.5, 1.5)), time_rollout=0.3, time_score=0.1,
                       time_reference=0.08,
                       tas=1.0, attention_group_std=0.01, adv_tas_corr=0.2, reward_accuracy=0.3, reward_attention=0.5)
        if step % 2 == 0:
            row.update(eval_tas=float(rng.uniform(0.9, 1.3)), eval_accuracy=float(rng.uniform(0, 1)),
                       eval_format=1.0, eval_reward_attention=0.5, eval_samples=8)
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_results_schema_summary_and_plot(tmp_path):
    seeds = [0, 1, 2]
    written = {(arm, s): _write_run(A.run_dir(tmp_path, arm, s), s, arm) for arm in A.ARMS for s in seeds}
    results = A.collect(tmp_path, seeds, {"eval_samples": 8})
    A.write_outputs(tmp_path, results)
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert set(loaded) == {"arms", "config"} and set(loaded["arms"]) == {"accuracy", "sayo"}
    for arm in A.ARMS:
        assert set(loaded["arms"][arm]) == {"0", "1", "2"}
        for s in seeds:
            got, rows = loaded["arms"][arm][str(s)], written[(arm, s)]
            evals = [r for r in rows if "eval_tas" in r]
            assert got["tas_start"] == evals[0]["eval_tas"] and got["tas_end"] == evals[-1]["eval_tas"]
            assert got["accuracy_start"] == evals[0]["eval_accuracy"]
            assert got["accuracy_end"] == evals[-1]["eval_accuracy"]
            assert got["curve"]["step"] == [0, 2, 4]
            assert got["step_time_s"] == pytest.approx(np.median([r["time_step"] for r in rows if r["step"]]))
    summary = (tmp_path / "summary.md").read_text()
    for arm in A.ARMS:
        tas_end = [loaded["arms"][arm][str(s)]["tas_end"] for s in seeds]
        cell = f"{np.mean(tas_end):.4f} ± {np.std(tas_end, ddof=1):.4f}"
        assert cell in next(line for line in summary.splitlines() if line.startswith(f"| {arm} |"))
    wins = sum(loaded["arms"]["sayo"][str(s)]["tas_end"] > loaded["arms"]["accuracy"][str(s)]["tas_end"]
               for s in seeds)
    assert f"above the accuracy arm's: {wins}/3 seeds" in summary
    with Image.open(tmp_path / "ablation.png") as im:
        assert im.size[0] > 800 and len(set(im.convert("L").getdata())) > 10


def test_a_run_without_evaluations_is_an_error(tmp_path):
    run = A.run_dir(tmp_path, "sayo", 0)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_total": 1.0, "time_step": 1.0}) + "\n")
    with pytest.raises(ValueError, match="without held-out evaluations"):
        A.arm_result(A.read_rows(run))
