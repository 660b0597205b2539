"""The trainer end to end on 2 CPU ranks (TP=2): resume is bit-for-bit, SIGTERM leaves a resumable checkpoint,
a corrupt latest checkpoint falls back to the previous one, and bad configs fail before any model is built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "megatron_sayo/configs/tiny.yaml"
VOLATILE = ("time_", "tokens_per_s")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_ckpt):
    """A synthetic data set shared by the runs of this module (the checkpoint comes from conftest)."""
    from megatron_sayo.train import write_synthetic

    data = tmp_path_factory.mktemp("data")
    write_synthetic(data / "train.jsonl", 16, seed=0)
    return tiny_ckpt, data / "train.jsonl"


def overrides(assets, run_dir, steps, interval=3):
    ckpt, train = assets
    return [f"model.hf_path={ckpt}", "model.make_tiny_if_missing=false", f"data.train_file={train}",
            "data.eval_file=null", "data.synthetic_n=0", f"run_dir={run_dir}", f"train.steps={steps}",
            "train.global_batch=2", "train.micro_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
            f"checkpoint.interval={interval}", "checkpoint.keep=2", "log.tensorboard=false", "warmup.steps=0",
            "eval.interval=0"]


def train_cmd(args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "megatron_sayo.train", "--config", str(CONFIG), *args]


def run_train(args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(train_cmd(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    run_train(overrides(assets, run, 6))
    return metrics(run)


@pytest.mark.multiproc
@pytest.mark.compat
def test_stop_and_resume_is_bit_for_bit(assets, tmp_path, uninterrupted):
    run_train(overrides(assets, tmp_path, 3))
    second = run_train(overrides(assets, tmp_path, 6))
    assert "resumed from" in second.stdout and "step_0000003" in second.stdout
    resumed = metrics(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [stable(r) for r in resumed] == [stable(r) for r in uninterrupted]
    assert len({r["sample_completion"] for r in resumed}) > 1, "completions must differ across steps"
    third = run_train(overrides(assets, tmp_path, 6))          # finished: says so, exits 0, logs nothing more
    assert f"{tmp_path}: already at step 6 (train.steps = 6): nothing to train" in third.stdout, third.stdout
    assert metrics(tmp_path) == resumed


@pytest.mark.multiproc
def test_sigterm_leaves_a_resumable_checkpoint(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(overrides(assets, tmp_path, 200, interval=0)), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "stopped by signal" in out, out[-3000:]
    stopped_at = metrics(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    run_train(overrides(assets, tmp_path, stopped_at + 1, interval=0))
    assert [r["step"] for r in metrics(tmp_path)][-2:] == [stopped_at, stopped_at + 1]


@pytest.mark.multiproc
def test_corrupt_latest_checkpoint_falls_back(assets, tmp_path, uninterrupted):
    run_train(overrides(assets, tmp_path, 4, interval=1))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000003", "step_0000004"]
    for f in (ckpts / "step_0000004").rglob("*.distcp"):
        f.write_bytes(b"garbage")
    (tmp_path / "metrics.jsonl").unlink()
    again = run_train(overrides(assets, tmp_path, 4, interval=1))
    assert "step_0000003" in again.stdout + again.stderr
    redone = metrics(tmp_path)
    assert [r["step"] for r in redone] == [4]
    assert stable(redone[0]) == stable(uninterrupted[3]), "the step redone from step 3 equals the original"


@pytest.mark.multiproc
def test_non_finite_losses_skip_then_stop(assets, tmp_path):
    """An absurd learning rate makes the weights inf: those steps are skipped, then the run stops."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = overrides(assets, tmp_path, 8, interval=0) + ["optim.lr=1e30", "optim.grad_clip=0",
                                                         "train.max_nan_steps_in_row=2"]
    done = subprocess.run(train_cmd(args), capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode != 0
    assert "2 non-finite losses in a row (train.max_nan_steps_in_row = 2)" in done.stdout + done.stderr
    rows = metrics(tmp_path)
    assert rows[0]["skipped"] is False and rows[-1]["skipped"] is True


@pytest.mark.multiproc
@pytest.mark.parametrize("args,needle", [
    (["train.stepz=3"], "train.stepz"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["parallel.tp=3"], "world size 2 is not divisible by tp*pp"),
    (["parallel.tp=2", "parallel.pp=2"], "world size 2 is not divisible"),
    (["model.attention_backend=eager"], "model.attention_backend"),
])
def test_bad_config_fails_before_building(args, needle, tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-m", "megatron_sayo.train", "--config", str(CONFIG), "--check",
                           f"run_dir={tmp_path}", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 2 and needle in done.stderr, done.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.multiproc
def test_training_from_a_converted_checkpoint_matches_the_hf_start(assets, tmp_path, uninterrupted):
    """model.megatron_path: a checkpoint converted at TP=1, trained at TP=2, gives the HF-started run's first step."""
    from megatron_sayo.convert.hf_to_megatron import convert_hf_to_megatron

    convert_hf_to_megatron(assets[0], tmp_path / "meg", tp=1, pp=1, progress=False)
    args = [a for a in overrides(assets, tmp_path / "run", 1) if not a.startswith("model.hf_path=")]
    run_train(args + ["model.hf_path=null", f"model.megatron_path={tmp_path / 'meg'}"])
    assert [stable(r) for r in metrics(tmp_path / "run")] == [stable(uninterrupted[0])]


@pytest.mark.multiproc
def test_capture_off_and_check_agree_with_capture(assets, tmp_path, uninterrupted):
    """rollout.capture_scores=false (a teacher-forced scoring pass) takes the captured run's first steps: the
    same completions and rewards; rollout.capture_check logs |captured - teacher-forced| <= 1e-5 per step."""
    run_train(overrides(assets, tmp_path / "off", 2) + ["rollout.capture_scores=false"])
    off = metrics(tmp_path / "off")
    for got, want in zip(off, uninterrupted[:2]):
        assert got["sample_completion"] == want["sample_completion"]
        for key in ("reward_total", "reward_attention", "reward_format", "tas", "entropy", "completion_tokens"):
            assert abs(got[key] - want[key]) <= 1e-5, key
    run_train(overrides(assets, tmp_path / "check", 2) + ["rollout.capture_check=true"])
    for row in metrics(tmp_path / "check"):
        diffs = {k: v for k, v in row.items() if k.startswith("capture_diff_")}
        assert set(diffs) == {f"capture_diff_{k}" for k in ("logprobs", "entropy", "region_mass", "image_mass")}
        assert all(0 <= v <= 1e-5 for v in diffs.values()), diffs


def test_synthetic_data_never_touches_a_user_folder(tmp_path):
    """data.train_file DIR/train.jsonl missing and a user folder DIR/train/ beside it: the folder survives;
    a folder already at the synthetic images' name is refused, not replaced."""
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.train import write_synthetic

    user = tmp_path / "train"
    user.mkdir()
    (user / "mine.txt").write_text("precious")
    write_synthetic(tmp_path / "train.jsonl", 4, seed=0)
    assert (user / "mine.txt").read_text() == "precious" and sorted(p.name for p in user.iterdir()) == ["mine.txt"]
    assert len(load_grounded(tmp_path / "train.jsonl")) == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    (tmp_path / "eval_synthetic").mkdir()
    (tmp_path / "eval_synthetic" / "mine.txt").write_text("also precious")
    with pytest.raises(FileExistsError, match="eval_synthetic"):
        write_synthetic(tmp_path / "eval.jsonl", 4, seed=1)
    assert (tmp_path / "eval_synthetic" / "mine.txt").read_text() == "also precious"
    assert not (tmp_path / "eval.jsonl").exists()


def check_cmd(*args, env_world=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if env_world:
        env.update(RANK="0", WORLD_SIZE=str(env_world))
    return subprocess.run([sys.executable, "-m", "megatron_sayo.train", "--config", str(CONFIG), "--check", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.multiproc
def test_check_fails_on_missing_or_empty_data_file(assets, tmp_path):
    ckpt, train = assets
    base = [f"model.hf_path={ckpt}", "model.make_tiny_if_missing=false", "data.synthetic_n=0",
            "data.eval_file=null", "eval.interval=0", f"run_dir={tmp_path / 'run'}"]
    missing = tmp_path / "nope.jsonl"
    done = check_cmd(*base, f"data.train_file={missing}", "--world-size", "2")
    assert done.returncode == 2 and f"data.train_file: {missing}: no such file" in done.stderr, done.stderr
    (tmp_path / "empty.jsonl").write_text("")
    done = check_cmd(*base, f"data.train_file={tmp_path / 'empty.jsonl'}", "--world-size", "2")
    assert done.returncode == 2 and "empty.jsonl: the file is empty" in done.stderr, done.stderr
    done = check_cmd(*base, f"data.train_file={train}", f"data.eval_file={missing}", "--world-size", "2")
    assert done.returncode == 2 and f"data.eval_file: {missing}: no such file" in done.stderr, done.stderr
    done = check_cmd(*base, f"data.train_file={train}", "--world-size", "2")
    assert done.returncode == 0 and "world size 2" in done.stdout, done.stderr


@pytest.mark.multiproc
def test_check_world_size_option_and_environment(assets, tmp_path):
    ckpt, train = assets
    base = [f"model.hf_path={ckpt}", "model.make_tiny_if_missing=false", "data.synthetic_n=0",
            "data.eval_file=null", "eval.interval=0", f"data.train_file={train}", f"run_dir={tmp_path / 'run'}"]
    done = check_cmd(*base, "--world-size", "3")           # tp=2 in the tiny config
    assert done.returncode == 2 and "world size 3 is not divisible by tp*pp" in done.stderr, done.stderr
    done = check_cmd(*base, env_world=3)
    assert done.returncode == 2 and "world size 3 is not divisible" in done.stderr, done.stderr
    done = check_cmd(*base, "--world-size", "4", env_world=3)  # the option wins over the environment
    assert done.returncode == 0 and "world size 4" in done.stdout, done.stderr


@pytest.mark.multiproc
def test_check_accepts_a_diff_only_vision_config(assets, tmp_path):
    """The 72B-AWQ config.json (transformers 4.49: vision_config with only non-default fields) passes --check
    at the 72B layout; a vision field no Qwen2.5-VL can have fails with the field named."""
    _, train = assets
    cfg = json.loads((ROOT / "examples/configs/qwen25vl_72b.config.json").read_text())
    cfg["vision_config"] = {"hidden_size": 1280, "in_chans": 3, "intermediate_size": 3456, "model_type": "qwen2_5_vl",
                            "out_hidden_size": 8192, "spatial_patch_size": 14, "tokens_per_second": 2}
    hf = tmp_path / "awq"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(cfg))
    base = [f"model.hf_path={hf}", "model.make_tiny_if_missing=false", "data.synthetic_n=0", "data.eval_file=null",
            "eval.interval=0",
            f"data.train_file={train}", "parallel.tp=8", "parallel.pp=2", f"run_dir={tmp_path / 'run'}"]
    done = check_cmd(*base, "--world-size", "16")
    assert done.returncode == 0 and "world size 16" in done.stdout, done.stderr
    cfg["vision_config"]["num_heads"] = 7
    (hf / "config.json").write_text(json.dumps(cfg))
    done = check_cmd(*base, "--world-size", "16")
    assert done.returncode == 2 and "vision_config: field 'hidden_size' = 1280 is not divisible by num_heads = 7" \
        in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.multiproc
def test_resume_with_another_lora_setting_is_refused_before_writing(assets, tmp_path):
    """Issue 29 item 6: a run dir whose newest checkpoint holds LoRA adapters, restarted with lora.enabled off
    (then with another lora.rank): the ranks exit 2 naming the setting and the checkpoint, before anything is written
    (config.yaml and the checkpoints as they were; no 'corrupt'/'falling back')."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0,
            "targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
            "base": {}}
    (step / "checkpoint_metadata.json").write_text(json.dumps({"kind": "trained policy", "lora": lora}))
    (run / "config.yaml").write_text("# the LoRA run's config\n")
    before = sorted((p.relative_to(run), p.read_bytes()) for p in run.rglob("*") if p.is_file())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for setting, expect in (("lora.enabled=false", "lora.enabled=True"),
                            ("lora.enabled=true lora.rank=8", "lora.rank=4")):
        args = overrides(assets, run, 1) + setting.split(" ")
        done = subprocess.run(train_cmd(args), capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]   # torchrun: its rank exited 2
        assert "config error" in done.stderr and expect in done.stderr and "step_0000002" in done.stderr
        assert "corrupt" not in done.stderr and "falling back" not in done.stderr
        assert sorted((p.relative_to(run), p.read_bytes()) for p in run.rglob("*") if p.is_file()) == before


@pytest.mark.multiproc
@pytest.mark.parametrize("extra, needle", [
    ([], "is set together with data.synthetic_n = 1024"),        # tiny.yaml's synthetic set + a named file
    (["data.synthetic_n=0"], "data.train_file: {typo}: no such file"),
])
@pytest.mark.parametrize("check", [True, False])
def test_a_typo_in_train_file_fails_in_check_and_in_training(tmp_path, extra, needle, check):
    """A user-named data file that does not exist stops `--check` and a training run with exit status 2 before
    any model is built, and nothing is written at (or beside) the typo's path."""
    typo = tmp_path / "trian.jsonl"
    args = [f"data.train_file={typo}", "data.eval_file=null", "eval.interval=0", "parallel.tp=1", *extra,
            f"run_dir={tmp_path / 'run'}", f"data.synthetic_dir={tmp_path / 'cache'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "megatron_sayo.train", "--config", str(CONFIG), *(["--check"] if check else []),
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and needle.format(typo=typo) in done.stderr, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
