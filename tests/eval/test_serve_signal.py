"""SIGTERM to the server (TP=2, ranks spawned locally) stops it cleanly: exit status 0, no rank traceback, no
leaked semaphores, whether the signal goes to the parent alone or to the whole process group (Ctrl-C, Slurm),
and whether it comes while the ranks start (before any handler of theirs exists) or once the server answers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_sayo.distributed.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _rank_processes(pid: int) -> list[int]:
    """The children of `pid` that are multiprocessing-spawned ranks (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ranks = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                ranks.append(int(child))
        except FileNotFoundError:
            pass
    return ranks


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(ready, proc, what: str) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.05)


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
        return True
    except OSError:
        return False


@pytest.mark.multiproc
@pytest.mark.parametrize("to_group", [False, True], ids=["parent", "group"])
@pytest.mark.parametrize("when", ["starting", "serving"])
def test_sigterm_stops_the_server_cleanly(tiny_ckpt, when, to_group):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sayo.eval.serve", "--hf", str(tiny_ckpt), "--tp", "2",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if when == "serving":
            _wait_until(lambda: _answers(port), proc, "the server answering /health")
        else:   # both rank processes exist, still importing: no signal handler of theirs is in place yet
            _wait_until(lambda: len(_rank_processes(proc.pid)) == 2, proc, "the ranks' start")
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: stopping the server" in out and "server stopped" in out, out[-3000:]
    for bad in ("Traceback", "leaked semaphore", "Error"):
        assert bad not in out, out[-3000:]


@pytest.mark.multiproc
def test_ranks_do_not_outlive_a_killed_server(tiny_ckpt):
    """SIGKILL to the server's parent process (the ranks ignore SIGTERM, their parent handles stops) leaves no
    rank behind holding the port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sayo.eval.serve", "--hf", str(tiny_ckpt), "--tp", "2",
                             "--port", str(port)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until(lambda: _answers(port), proc, "the server answering /health")
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 2, ranks
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 20
        while (left := [r for r in ranks if _alive(r)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"ranks {left} outlived their killed parent"
        assert not _answers(port), "the port still answers"
    finally:
        with contextlib.suppress(ProcessLookupError):   # the group is gone with its last process
            os.killpg(proc.pid, signal.SIGKILL)
