"""Issue 29 item 6, kept by removing the helper: megatron's torch_dist writer collects its results through a
multiprocessing manager (one spawned process per rank) unless given a queue; our synchronous saves give it an
in-process one, so a save leaves no process behind (nothing to outlive a SIGKILLed trainer or to die on the
signals Slurm sends a job step) and the checkpoint a trainer writes on those signals is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SAVER = """
import sys, time, torch
from megatron_sayo.checkpoint import state
from megatron_sayo.checkpoint.loader import load_model_stage
from megatron_sayo.distributed import runtime
runtime.init_distributed(1, 1, launch=runtime.LaunchEnv(0, 1, 0, "127.0.0.1", runtime.free_port(), "single"))
model = load_model_stage(sys.argv[1])
state.save_training_state(sys.argv[2], 1, model, torch.optim.SGD(model.parameters(), lr=0.1))
print("saved", flush=True)
time.sleep(600)
"""


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_saver(proc: subprocess.Popen, marker: str) -> list[str]:
    """Read `proc`'s output up to the line starting with `marker` (its first save); the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            break
    assert lines and lines[-1].startswith(marker), "".join(lines[-20:])
    return lines


def run_script(script: str, *args, **popen) -> subprocess.Popen:
    """`script` in a fresh python with `args`, output merged and read as text, one thread."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


@pytest.mark.multiproc
def test_a_save_leaves_no_process_behind(tiny_ckpt, tmp_path):
    """After a save the saving process has no child left (megatron's default left its manager, which outlived
    a SIGKILLed trainer until we started it with PR_SET_PDEATHSIG)."""
    proc = run_script(SAVER, tiny_ckpt, tmp_path / "run")
    try:
        start_saver(proc, "saved")
        deadline = time.monotonic() + 15     # the writer's forked workers are joined by the save; give exit time
        while (left := [p for p in children(proc.pid) if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"the save left processes {left} behind"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


SAVE_TWICE = """
import signal, sys, time, torch
from megatron_sayo.checkpoint import state
from megatron_sayo.checkpoint.loader import load_model_stage
from megatron_sayo.distributed import runtime
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):        # the trainer records them (it checkpoints, then stops)
    signal.signal(sig, lambda signum, _frame: got.append(signum))
runtime.init_distributed(1, 1, launch=runtime.LaunchEnv(0, 1, 0, "127.0.0.1", runtime.free_port(), "single"))
model = load_model_stage(sys.argv[1])
opt = torch.optim.SGD(model.parameters(), lr=0.1)
state.save_training_state(sys.argv[2], 1, model, opt)
print("saved 1", flush=True)
deadline = time.monotonic() + 60
while len(got) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print("trainer got", *sorted(map(int, got)), flush=True)   # both pending: delivered in any order
state.save_training_state(sys.argv[2], 2, model, opt)
print("saved 2", flush=True)
"""


@pytest.mark.multiproc
def test_the_checkpoint_after_the_signals_slurm_sends_a_step_is_written(tiny_ckpt, tmp_path):
    """Slurm sends USR1 (preemption) or TERM (scancel) to every process of a job step; the trainer records them
    and writes a checkpoint. Sent to the saver's whole process group after its first save, the second save is
    written. (With megatron's manager helper, which got them too, it failed with EOFError.)"""
    proc = run_script(SAVE_TWICE, tiny_ckpt, tmp_path / "run", start_new_session=True)
    try:
        lines = start_saver(proc, "saved 1")
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.killpg(proc.pid, sig)
        lines += proc.stdout.readlines()      # to the end: the second save, then exit
        assert proc.wait(120) == 0, "".join(lines[-30:])
        assert f"trainer got {int(signal.SIGUSR1)} {int(signal.SIGTERM)}\n" in lines, "".join(lines[-30:])
        assert "saved 2\n" in lines, "".join(lines[-30:])
        assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_0000002"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
