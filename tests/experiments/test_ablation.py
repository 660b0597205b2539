"""The ablation command (the paper's Table 2 on CPU): its arms differ only in the reward weights (and, for arms made
with --arm, in the method-variant keys), user overrides cannot break that, arm definitions are validated before
anything runs, and per-toy results.json / summary.md / ablation.png plus DIR/summary.md and DIR/ablation.png come
out with the issue's schema and numbers equal to numpy's; a tiny end-to-end run of both toys."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megatron_sayo.config import ConfigError, load_config
from megatron_sayo.experiments import ablation


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def arm_config(tmp_path, arm, seed, extra=(), toy="tiles", overrides=None):
    over = ablation.ARMS[arm] if overrides is None else overrides
    overrides = ablation.arm_overrides(tmp_path, toy, over, arm, seed, list(extra))
    return flat(load_config(str(ablation.CONFIG), overrides).to_dict())


def test_arms_differ_only_in_reward_weights(tmp_path):
    extra = ["optim.lr=2e-4"]
    cfgs = {arm: arm_config(tmp_path, arm, 0, extra) for arm in ablation.ARMS}
    want = {"attention": (1.0, 0.0, 1.0), "accuracy": (0.0, 1.0, 1.0), "full": (1.0, 1.0, 1.0)}
    for arm, cfg in cfgs.items():
        differ = {k for k in cfg if cfg[k] != cfgs["full"][k]}
        assert differ <= {"reward.weights.attention", "reward.weights.accuracy", "run_dir"}, arm
        assert tuple(cfg[f"reward.weights.{k}"] for k in ("attention", "accuracy", "format")) == want[arm]
        assert cfg["optim.lr"] == 2e-4                                  # user overrides reach every arm
    other_seed = arm_config(tmp_path, "full", 1, extra)
    assert {k for k in cfgs["full"] if cfgs["full"][k] != other_seed[k]} == {"train.seed", "run_dir"}
    # one warm-up per toy for every arm and seed: its cache, data and seed do not depend on the arm or GRPO seed
    assert cfgs["accuracy"]["warmup.cache_dir"] == other_seed["warmup.cache_dir"]
    assert cfgs["accuracy"]["warmup.seed"] == other_seed["warmup.seed"]
    # a variant arm differs from its base in its own key only; a toy in the toy's settings only
    name, over = ablation.parse_arm("attention_answer=attention:reward.token_selection=answer", ablation.ARMS)
    variant = arm_config(tmp_path, name, 0, extra, overrides=over)
    assert {k for k in variant if variant[k] != cfgs["attention"][k]} == {"reward.token_selection", "run_dir"}
    reasoning = arm_config(tmp_path, "full", 0, extra, toy="tiles_reasoning")
    toy_keys = {o.split("=")[0] for toy in ablation.TOYS.values() for o, _ in toy}
    assert {k for k in reasoning if reasoning[k] != cfgs["full"][k]} <= toy_keys | {"run_dir", "data.train_file",
                                                                                   "data.eval_file"}
    assert reasoning["data.synthetic_task"] == "tiles_reasoning" and cfgs["full"]["data.synthetic_task"] == "tiles"


@pytest.mark.parametrize("bad", ["reward.weights.attention=0.5", "train.seed=3", "run_dir=/tmp/x",
                                 "data.synthetic_task=shapes"])
def test_overrides_that_define_an_arm_are_refused(bad):
    with pytest.raises(ConfigError, match="set per (arm|toy)"):
        ablation.check_overrides(["train.steps=3", bad])


@pytest.mark.multiproc     # ablation.main starts the arms' training processes if its checks let a bad argument through
@pytest.mark.parametrize("argv, needle", [
    (["--arm", "x=attention:train.steps=3"], "train.steps is not a method-variant setting"),
    (["--arm", "x=sayo:reward.token_selection=all"], "BASE one of attention, accuracy, full"),
    (["--arm", "full=attention:reward.token_selection=all"], "exists already"),
    (["--arm", "x=attention:reward.token_selection=most"], "reward.token_selection"),
    (["--arms", "accuracy,sayo"], "--arms"),
    (["--toys", "shapes"], "--toys"),
])
def test_bad_arms_and_toys_fail_before_anything_runs(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    assert ablation.main(["--out", str(out), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


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
    seeds, toys = [0, 1, 2], ["tiles", "tiles_reasoning"]
    written, by_toy = {}, {}
    for toy in toys:
        for arm in ablation.ARMS:
            for s in seeds:
                written[(toy, arm, s)] = _write_run(ablation.run_dir(tmp_path / toy, arm, s), s, arm + toy)
        by_toy[toy] = ablation.collect(tmp_path / toy, list(ablation.ARMS), seeds,
                                {"eval_samples": 8, "arm_overrides": {a: list(o) for a, o in ablation.ARMS.items()}})
    ablation.write_outputs(tmp_path, by_toy)
    top = (tmp_path / "summary.md").read_text()
    for toy in toys:
        loaded = json.loads((tmp_path / toy / "results.json").read_text())
        assert set(loaded) == {"arms", "config"} and list(loaded["arms"]) == ["attention", "accuracy", "full"]
        for arm in ablation.ARMS:
            assert set(loaded["arms"][arm]) == {"0", "1", "2"}
            for s in seeds:
                got, rows = loaded["arms"][arm][str(s)], written[(toy, arm, s)]
                evals = [r for r in rows if "eval_tas" in r]
                for name, key in (("tas", "eval_tas"), ("accuracy", "eval_accuracy"), ("format", "eval_format"),
                                  ("reward_attention", "eval_reward_attention")):
                    assert got[f"{name}_start"] == evals[0][key] and got[f"{name}_end"] == evals[-1][key]
                    assert got["curve"][name] == [r[key] for r in evals]
                assert got["curve"]["step"] == [0, 2, 4]
                assert got["step_time_s"] == pytest.approx(np.median([r["time_step"] for r in rows if r["step"]]))
        summary = (tmp_path / toy / "summary.md").read_text()
        section = top.split(f"## {toy}\n")[1].split("\n## ")[0]
        for arm, label, marks in (("attention", "w/ Attn. Reward", "| ✓ |  | ✓ |"),
                                  ("accuracy", "w/ Acc. Reward", "|  | ✓ | ✓ |"),
                                  ("full", "Full (Attn. + Acc.)", "| ✓ | ✓ | ✓ |")):
            tas = [loaded["arms"][arm][str(s)]["tas_end"] for s in seeds]
            acc0 = [loaded["arms"][arm][str(s)]["accuracy_start"] for s in seeds]
            acc1 = [loaded["arms"][arm][str(s)]["accuracy_end"] for s in seeds]
            cell = f"{np.mean(tas):.4f} ± {np.std(tas, ddof=1):.4f}"
            assert cell in next(line for line in summary.splitlines() if line.startswith(f"| {arm} |"))
            row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
            assert row.startswith(f"| {label} {marks}")
            assert (f"{np.mean(acc0):.4f} ± {np.std(acc0, ddof=1):.4f} -> "
                    f"{np.mean(acc1):.4f} ± {np.std(acc1, ddof=1):.4f}") in row
            if arm != "accuracy":
                base = [loaded["arms"]["accuracy"][str(s)]["tas_end"] for s in seeds]
                wins = sum(t > b for t, b in zip(tas, base))
                assert f"- {arm}: held-out TAS at the end above the accuracy arm's: {wins}/3 seeds" in summary
        with Image.open(tmp_path / toy / "ablation.png") as im:
            assert im.size[0] > 800 and len(set(im.convert("L").getdata())) > 10
    with Image.open(tmp_path / "ablation.png") as im:   # one row of axes per toy
        assert im.size[1] > im.size[0] * 0.6


@pytest.mark.slow
@pytest.mark.multiproc
def test_tiny_ablation_end_to_end(tmp_path, tiny_ckpt):
    """Both toys, two arms, one seed, one GRPO step on the tiny model: the files and tables come out."""
    out = tmp_path / "out"
    tiny = [f"model.hf_path={tiny_ckpt}", "model.make_tiny_if_missing=false", "data.synthetic_n=16",
            "warmup.steps=1", "train.steps=1", "eval.interval=1", "eval.num_samples=2", "eval.batch=2",
            "rollout.group_size=2", "train.global_batch=2", "train.micro_batch=2", "rollout.max_new_tokens=3"]
    assert ablation.main(["--out", str(out), "--arms", "attention,full", "--seeds", "0", *tiny]) == 0
    top = (out / "summary.md").read_text()
    for toy in ablation.TOYS:
        results = json.loads((out / toy / "results.json").read_text())
        assert list(results["arms"]) == ["attention", "full"] and set(results["arms"]["full"]) == {"0"}
        got = results["arms"]["full"]["0"]
        assert got["curve"]["step"] == [0, 1] and {"format_end", "reward_attention_end"} <= set(got)
        assert results["config"]["shared"]["data"]["synthetic_task"] == toy
        assert results["config"]["warmup_ranks"] == 2         # the shared warm-up ran data parallel on 2 ranks
        assert f"## {toy}" in top and "| w/ Attn. Reward |" in top and "| Full (Attn. + Acc.) |" in top
        assert (out / toy / "ablation.png").is_file()
    assert (out / "ablation.png").is_file()


def test_a_run_without_evaluations_is_an_error(tmp_path):
    run = ablation.run_dir(tmp_path, "full", 0)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_total": 1.0, "time_step": 1.0}) + "\n")
    with pytest.raises(ValueError, match="without held-out evaluations"):
        ablation.arm_result(ablation.read_rows(run))


def test_the_shared_warm_up_runs_on_as_many_ranks_as_split_its_batches(tmp_path):
    """One rank per --jobs core when the warm-up's answers and the step's batches split evenly, else fewer."""
    def ranks(jobs, *extra):
        cfg = load_config(str(ablation.CONFIG), ablation.arm_overrides(tmp_path, "tiles", ablation.ARMS["full"],
                                                                       "full", 0, list(extra)))
        return ablation.warmup_ranks(cfg, jobs)

    assert ranks(2) == 2 and ranks(1) == 1
    assert ranks(4) == 2                                   # 32 completions do not fill 4 ranks x micro_batch 16
    assert ranks(4, "train.micro_batch=8") == 4
    assert ranks(2, "train.global_batch=3") == 1           # 3 prompts do not split over 2 ranks
