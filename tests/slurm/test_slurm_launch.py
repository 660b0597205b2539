"""slurm/*.sbatch + slurm/launch.sh.

Static checks (always run): every script parses with `bash -n`, no #SBATCH line pins an account, the 72B
layout is the planner's recommendation. The `slurm` tests submit slurm/train_72b.sbatch itself to a real
Slurm (`make slurm-local`), turned into a tiny 2-task CPU job by sbatch options and config overrides
(docs/slurm.md), and check what the jobs leave behind: job state, metrics.jsonl, checkpoints, restarts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_utils import job_output, job_state, require_slurm, wait_for

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + [SLURM_DIR / "launch.sh"]
TRAIN_72B = SLURM_DIR / "train_72b.sbatch"
TINY = "megatron_sayo/configs/tiny.yaml"


# ------------------------------------------------------------------------------------------------------------
# static
# ------------------------------------------------------------------------------------------------------------

def test_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"train_72b.sbatch", "train_7b.sbatch", "convert.sbatch", "eval.sbatch", "launch.sh"} <= names


@pytest.mark.multiproc
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", sorted(SLURM_DIR.glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_header_has_no_account_and_logs_per_job(script):
    lines = [ln for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert lines, f"{script.name} has no #SBATCH lines"
    for ln in lines:
        assert not re.search(r"(--account\b|\s-A\b)", ln), f"{script.name} hard-codes an account: {ln}"
        assert not re.search(r"(--partition\b|\s-p\b)", ln), f"{script.name} hard-codes a partition: {ln}"
    assert "#SBATCH --output=logs/%x-%j.out" in lines
    # the directory must exist before sbatch, or Slurm cannot open the log
    assert (ROOT / "logs").is_dir()


@pytest.mark.parametrize("name", ["train_72b.sbatch", "train_7b.sbatch"])
def test_train_scripts_are_preemptible(name):
    text = (SLURM_DIR / name).read_text()
    assert "#SBATCH --requeue" in text
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M)


@pytest.mark.multiproc
def test_72b_layout_is_the_planners_recommendation():
    cfg = yaml.safe_load((ROOT / "examples/qwen25vl_72b.yaml").read_text())
    frozen = ["--freeze-vision"] if cfg["model"].get("freeze_vision") else []
    out = subprocess.run([sys.executable, str(ROOT / "tools/plan_parallelism.py"), "--model",
                          str(ROOT / "examples/configs/qwen25vl_72b.config.json"), "--gpus", "64",
                          "--gpu-memory", "80GB", "--json", *frozen], capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout)["recommended"]
    assert (cfg["parallel"]["tp"], cfg["parallel"]["pp"]) == (rec["tp"], rec["pp"])
    header = TRAIN_72B.read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", header, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", header, re.M).group(1))
    tasks = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", header, re.M).group(1))
    assert tasks == gpus and nodes * gpus == 64 == rec["tp"] * rec["pp"] * rec["dp"]


# ------------------------------------------------------------------------------------------------------------
# real Slurm
# ------------------------------------------------------------------------------------------------------------

def tiny_job(tmp: Path, name: str) -> list[str]:
    """sbatch options that make train_72b.sbatch a 2-task CPU job on one node (log under tmp)."""
    return ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
            "--signal=B:USR1@30", f"--job-name={name}", f"--output={tmp}/%x-%j.out"]


def tiny_overrides(tmp: Path, steps: int) -> list[str]:
    """Config overrides for a few seconds per step: small groups/completions, data and run_dir under tmp."""
    return [TINY, f"train.steps={steps}", "train.global_batch=2", "train.micro_batch=4", "rollout.group_size=2",
            "rollout.max_new_tokens=8", "warmup.steps=0", "data.synthetic_n=8", "checkpoint.interval=0",
            f"data.synthetic_dir={tmp}/data", f"run_dir={tmp}/run", "log.tensorboard=false", "eval.interval=0"]


def submit_tiny(tmp: Path, name: str, config_args: list[str]) -> str:
    """sbatch [tiny options] slurm/train_72b.sbatch CONFIG key=value...; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", *tiny_job(tmp, name), f"--chdir={ROOT}", str(TRAIN_72B),
                          *config_args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def log_of(tmp: Path, name: str, job: str) -> str:
    return job_output(tmp / f"{name}-{job}.out")


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    assert latest.is_dir() and (latest / "metadata.json").is_file(), sorted(p.name for p in root.iterdir())
    return latest


def job_field(job: str, field: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    m = re.search(rf"\b{field}=(\S+)", out.stdout)
    return m.group(1) if m else None


@pytest.mark.multiproc
@pytest.mark.slurm
def test_config_typo_fails_in_seconds(tmp_path):
    require_slurm()
    start = time.monotonic()
    job = submit_tiny(tmp_path, "typo", tiny_overrides(tmp_path, 3) + ["train.stepz=3"])
    state = wait_for(job, timeout=120)
    took = time.monotonic() - start
    text = log_of(tmp_path, "typo", job)
    assert state == "FAILED", text
    assert job_field(job, "ExitCode") == "2:0", text
    assert "train.stepz" in text and "unknown key" in text, text
    assert not (tmp_path / "run").exists(), "a rank started although the config was invalid"
    assert took < 60, f"the typo took {took:.0f}s to fail"


@pytest.mark.multiproc
@pytest.mark.slurm
def test_tiny_cpu_job_trains_and_checkpoints(tmp_path):
    require_slurm()
    job = submit_tiny(tmp_path, "tiny", tiny_overrides(tmp_path, 3))
    state = wait_for(job, timeout=400)
    text = log_of(tmp_path, "tiny", job)
    assert state == "COMPLETED", text
    run = tmp_path / "run"
    assert metric_steps(run) == [1, 2, 3], text
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["reward_total"], float) for r in rows)
    assert latest_checkpoint(run).name == "step_0000003"


def preempt_after_next_step(job: str, run: Path, log: Path, scancel_args: list[str], restarts: int) -> int:
    """Wait for a new metrics line, send USR1 with `scancel_args`, wait until the job requeued itself
    (Restarts=`restarts`, pending); release it at once (Slurm holds a requeued job ~2 min). Returns the
    step the run stopped at."""
    seen = len(metric_steps(run))
    deadline = time.monotonic() + 400
    while len(metric_steps(run)) <= seen:
        assert time.monotonic() < deadline, f"no new step after 400s (state {job_state(job)})"
        assert job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), job_output(log)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", *scancel_args, job], check=True)
    deadline = time.monotonic() + 300
    while not (job_field(job, "Restarts") == str(restarts) and job_state(job) == "PENDING"):
        assert time.monotonic() < deadline, f"job not requeued (state {job_state(job)}):\n{job_output(log)}"
        assert job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED"), job_output(log)
        time.sleep(0.2)
    stopped_at = metric_steps(run)[-1]
    assert latest_checkpoint(run).name == f"step_{stopped_at:07d}", "stopped without its checkpoint"
    # Releasing the requeued job while the node still completes its previous run makes slurmctld kill it
    # ("Job credential revoked"): wait for the node to be idle first.
    deadline = time.monotonic() + 120
    while subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip() != "idle":
        assert time.monotonic() < deadline, "node did not return to idle after the requeue"
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    return stopped_at


@pytest.mark.multiproc
@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path):
    """Preempted twice: USR1 to the batch shell (what `#SBATCH --signal=B:USR1@T` sends; the launcher forwards
    it), then USR1 to the job's steps (what `--signal=USR1@T` or `scancel --signal=USR1 JOB` send). Each time
    the trainer checkpoints, the job requeues itself and the next run resumes from that step."""
    require_slurm()
    # the tiny steps take ~0.2 s: with 8 the run ended (in its final checkpoint) before the first USR1 landed;
    # 30 leave seconds between "a new step was logged" and the end for each preemption to arrive mid-run
    steps = 30
    job = submit_tiny(tmp_path, "preempt", tiny_overrides(tmp_path, steps))
    run, log = tmp_path / "run", tmp_path / f"preempt-{job}.out"

    first = preempt_after_next_step(job, run, log, ["--batch"], restarts=1)
    second = preempt_after_next_step(job, run, log, [], restarts=2)
    assert first < second < steps, (first, second)

    state = wait_for(job, timeout=400)
    text = job_output(log)
    assert state == "COMPLETED", text
    assert job_field(job, "Restarts") == "2", text
    # each run resumed at the checkpointed step: every step once, in order
    assert metric_steps(run) == list(range(1, steps + 1)), text
    assert latest_checkpoint(run).name == f"step_{steps:07d}"


@pytest.mark.multiproc
@pytest.mark.slurm
def test_convert_job_writes_megatron_checkpoint(tmp_path, tiny_ckpt):
    require_slurm()
    out_dir = tmp_path / "megatron"
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=0", "--time=10",
                          f"--output={tmp_path}/%x-%j.out", f"--chdir={ROOT}", str(SLURM_DIR / "convert.sbatch"),
                          "--hf", str(tiny_ckpt), "--out", str(out_dir), "--tp", "2", "--no-progress"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    state = wait_for(job, timeout=300)
    text = job_output(tmp_path / f"sayo-convert-{job}.out")
    assert state == "COMPLETED", text
    meta = json.loads((out_dir / "checkpoint_metadata.json").read_text())
    assert meta["kind"] == "converted" and meta["layout"] == {"tp": 2, "pp": 1}, meta
    assert meta["source"] == str(tiny_ckpt)
    assert (out_dir / "metadata.json").is_file() and (out_dir / "config.json").is_file()
