"""Issue 29 item 6: the helper processes the checkpoint writer starts (megatron's torch_dist writer collects its
results through a multiprocessing manager, one process per rank) end with their trainer, SIGKILL included."""

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


def start_saver(proc: subprocess.Popen, marker: str) -> tuple[list[str], list[int]]:
    """Read `proc`'s output up to the line starting with `marker` (its first save); (lines read, the writer's
    helper processes, at least one)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            break
    assert lines and lines[-1].startswith(marker), "".join(lines[-20:])
    helpers = children(proc.pid)
    assert helpers, "the writer started no helper process (nothing to test)"
    return lines, helpers


def run_script(script: str, *args, **popen) -> subprocess.Popen:
    """`script` in a fresh python with `args`, output merged and read as text, one thread."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


@pytest.mark.multiproc
def test_writer_helpers_die_with_a_sigkilled_trainer(tiny_ckpt, tmp_path):
    proc = run_script(SAVER, tiny_ckpt, tmp_path / "run")
    try:
        _, helpers = start_saver(proc, "saved")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in helpers if alive(p)]
    for p in left:                          # do not leave them behind on the old code either
        os.kill(p, signal.SIGKILL)
    assert not left, f"helper processes {left} outlived their trainer"


SAVE_TWICE = """
import signal, sys, time, torch
from megatron_sayo.checkpoint import state
from megatron_sayo.checkpoint.loader import load_model_stage
from megatron_sayo.distributed import runtime
for sig in (signal.SIGUSR1, signal.SIGTERM):        # the trainer catches them (it checkpoints, then stops)
    signal.signal(sig, lambda *_: print("trainer got", _[0], flush=True))
runtime.init_distributed(1, 1, launch=runtime.LaunchEnv(0, 1, 0, "127.0.0.1", runtime.free_port(), "single"))
model = load_model_stage(sys.argv[1])
opt = torch.optim.SGD(model.parameters(), lr=0.1)
state.save_training_state(sys.argv[2], 1, model, opt)
print("saved 1", flush=True)
sys.stdin.readline()
state.save_training_state(sys.argv[2], 2, model, opt)
print("saved 2", flush=True)
"""


@pytest.mark.multiproc
def test_writer_helpers_outlive_the_signals_slurm_sends_a_step(tiny_ckpt, tmp_path):
    """Slurm sends USR1 (preemption) or TERM (scancel) to every process of a job step, the writer's helper
    included; the trainer catches them and writes a checkpoint, which needs the helper: it must ignore them.
    (Before: the spawned helper died on USR1 and the preemption checkpoint failed with EOFError.)"""
    proc = run_script(SAVE_TWICE, tiny_ckpt, tmp_path / "run", stdin=subprocess.PIPE)
    try:
        lines, helpers = start_saver(proc, "saved 1")
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            for p in helpers:
                os.kill(p, sig)
        time.sleep(1)
        dead = [p for p in helpers if not alive(p)]
        assert not dead, f"helper processes {dead} died on the step's signals"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        lines += proc.stdout.readlines()      # to the end: the second save, then exit
        assert proc.wait(120) == 0 and "saved 2\n" in lines, "".join(lines[-30:])
        assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_0000002"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
