"""slurm/launch.sh's pre-flight passes the job's GPU memory to `train --check` (no Slurm needed: the launcher
runs with a job's environment, a stand-in nvidia-smi and a stand-in interpreter that records its arguments)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def launch(tmp_path: Path, nvidia_smi: str | None, extra_env: dict | None = None) -> tuple[int, str, str]:
    """Run `launch.sh train` as an 8-GPU job whose config check exits 3; (rc, output, recorded check args)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "args"
    python = bin_dir / "python"
    python.write_text(f'#!/bin/bash\necho "$@" > {record}\nexit 3\n')
    tools = {"nvidia-smi": nvidia_smi, "git": "exit 1"}
    for name, body in tools.items():
        if body is not None:
            (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "t",
           "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_GPUS_PER_NODE": "8", "SAYO_ROOT": str(ROOT), "SAYO_PYTHON": str(python),
           "MASTER_ADDR": "n1", "MASTER_PORT": "29500", **(extra_env or {})}
    out = subprocess.run(["bash", str(ROOT / "slurm/launch.sh"), "train", "examples/qwen25vl_7b.yaml"],
                         env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    args = record.read_text() if record.exists() else ""
    return out.returncode, out.stdout + out.stderr, args


@pytest.mark.multiproc
def test_check_gets_the_smallest_gpu_nvidia_smi_reports(tmp_path):
    rc, out, args = launch(tmp_path, "printf '81559\\n40960\\n'")
    assert rc == 3 and "config check failed (exit 3)" in out, out
    assert args.split()[-3:] == ["--check", "--gpu-memory", "40960MiB"], args


@pytest.mark.multiproc
def test_sayo_gpu_memory_wins(tmp_path):
    rc, _, args = launch(tmp_path, "printf '81559\\n'", {"SAYO_GPU_MEMORY": "141GB"})
    assert args.split()[-3:] == ["--check", "--gpu-memory", "141GB"], args


@pytest.mark.multiproc
def test_unknown_gpu_memory_stops_before_the_check(tmp_path):
    rc, out, args = launch(tmp_path, "exit 9")
    assert rc == 2 and "SAYO_GPU_MEMORY" in out and args == "", out


@pytest.mark.multiproc
def test_cpu_job_checks_without_gpu_memory(tmp_path):
    rc, _, args = launch(tmp_path, "exit 1", {"SLURM_GPUS_PER_NODE": "0"})
    assert rc == 3 and args.split()[-1] == "--check" and "--gpu-memory" not in args, args
