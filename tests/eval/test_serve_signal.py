"""SIGTERM to the server (TP=2, ranks spawned locally) stops it cleanly: exit status 0, no rank traceback, no
leaked semaphores, whether the signal goes to the parent alone or to the whole process group (Ctrl-C, Slurm)."""

from __future__ import annotations

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


@pytest.mark.multiproc
@pytest.mark.parametrize("to_group", [False, True], ids=["parent", "group"])
def test_sigterm_stops_the_server_cleanly(tiny_ckpt, to_group):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sayo.eval.serve", "--hf", str(tiny_ckpt), "--tp", "2",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
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
