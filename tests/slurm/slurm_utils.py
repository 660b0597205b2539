"""Helpers for tests that submit real Slurm jobs (see scripts/slurm_local.sh, `make slurm-local`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path

HOW_TO_GET = "start a one-node Slurm with `make slurm-local` (scripts/slurm_local.sh start, needs root + apt)"
USABLE_NODE_STATES = {"idle", "mix", "alloc", "comp"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


def _run(cmd: list[str], env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a Slurm client command and capture its text output."""
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@lru_cache(maxsize=1)
def slurm_available() -> tuple[bool, str]:
    """(True, "") when sbatch exists and a controller reports a usable node, else (False, why)."""
    missing = [c for c in ("sbatch", "sinfo", "scontrol") if shutil.which(c) is None]
    if missing:
        return False, f"Slurm client {missing[0]} not found; {HOW_TO_GET}"
    try:
        out = _run(["sinfo", "-h", "-o", "%t"], timeout=10)
    except subprocess.TimeoutExpired:
        return False, f"sinfo timed out (no slurmctld answers); {HOW_TO_GET}"
    if out.returncode != 0:
        return False, f"no Slurm controller answers ({out.stderr.strip()}); {HOW_TO_GET}"
    states = {s.strip().rstrip("*~#") for s in out.stdout.split()}
    if not states & USABLE_NODE_STATES:
        return False, f"no usable Slurm node (states: {sorted(states)}); {HOW_TO_GET}"
    return True, ""


def require_slurm() -> None:
    """Skip the calling test, with the reason, unless a Slurm controller can run jobs (checked once)."""
    import pytest

    ok, why = slurm_available()
    if not ok:
        pytest.skip(why)


def submit(script: str | os.PathLike, args: list[str] | tuple = (), env: dict | None = None) -> str:
    """sbatch `args` `script`; return the job id. `env` is added to this process's environment."""
    full_env = {**os.environ, **(env or {})}
    out = _run(["sbatch", "--parsable", *map(str, args), str(script)], env=full_env)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str | None:
    """Current state of a job from scontrol, falling back to sacct; None when neither knows it."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    for field in out.stdout.split() if out.returncode == 0 else ():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    out = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
    lines = out.stdout.split() if out.returncode == 0 else []
    return lines[0].split()[0] if lines else None


def wait_for(job_id: str, timeout: float = 120, poll: float = 0.5) -> str:
    """Block until the job reaches a final state and return it; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in FINAL_STATES:
            return state
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} not finished after {timeout}s (last state {state})")


def job_output(path: str | os.PathLike, wait: float = 5) -> str:
    """Text of a job's output file, waiting up to `wait` seconds for it to appear."""
    path = Path(path)
    deadline = time.monotonic() + wait
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not path.exists():
        raise FileNotFoundError(f"job output {path} was not written")
    return path.read_text()
