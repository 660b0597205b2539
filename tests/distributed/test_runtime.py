"""runtime: where a process sits in the job, from torchrun's or Slurm's environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sayo.distributed import runtime


def test_torchrun_env_wins():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert runtime.read_launch_env(env) == runtime.LaunchEnv(3, 8, 1, "node7", 1234, "torchrun")


def test_slurm_env(monkeypatch):
    monkeypatch.setattr(runtime, "first_host", lambda nodelist: {"gpu[003-005]": "gpu003"}[nodelist])
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[003-005]",
           "SLURM_JOB_ID": "424242"}
    launch = runtime.read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.launcher) == \
        (5, 16, 5, "gpu003", "slurm")
    assert launch.master_port == 20000 + 424242 % 20000  # same on every rank of the job
    other = runtime.read_launch_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "999"})
    assert (other.master_addr, other.master_port) == ("head", 999)


def test_single_process():
    assert runtime.read_launch_env({}) == runtime.LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "single")


@pytest.mark.parametrize("nodelist,first", [("gpu[003-005,9],cpu1", "gpu003"), ("node12", "node12"),
                                            ("a1,b2", "a1"), ("dgx[10,12]", "dgx10")])
def test_first_host_without_scontrol(monkeypatch, nodelist, first):
    def no_scontrol(*args, **kwargs):
        raise FileNotFoundError("scontrol")
    monkeypatch.setattr(runtime.subprocess, "run", no_scontrol)
    assert runtime.first_host(nodelist) == first


def _world_info(tp, pp):
    from megatron.core import parallel_state as ps

    runtime.init_distributed(tp, pp)
    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_world_size())


@pytest.mark.multiproc
def test_parallel_state_layout_from_spawned_ranks():
    ranks = runtime.spawn_local(_world_info, 4, 2, 1)
    assert sorted(ranks) == [(0, 0, 2), (0, 0, 2), (1, 0, 2), (1, 0, 2)]


def test_world_not_divisible():
    with pytest.raises(ValueError, match="world size 3 is not divisible by tp\\*pp = 2\\*1"):
        runtime.init_distributed(2, 1, launch=runtime.LaunchEnv(0, 3, 0, "127.0.0.1", 1, "torchrun"))


ORPHAN_SCRIPT = '''
import os, sys, time
from pathlib import Path

def sleeper(out):
    Path(out, f"rank_{os.environ['RANK']}").write_text(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    from megatron_sayo.distributed.runtime import spawn_local
    from orphan_fn import sleeper
    spawn_local(sleeper, 2, sys.argv[1], timeout_s=300)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:     # a zombie is gone for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.multiproc
def test_spawned_ranks_die_with_their_parent(tmp_path):
    """A tool or test killed with SIGKILL leaves no ranks behind (they would wait on collectives for 30 min)."""
    (tmp_path / "orphan_fn.py").write_text(ORPHAN_SCRIPT)
    root = Path(runtime.__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{root}")
    parent = subprocess.Popen([sys.executable, str(tmp_path / "orphan_fn.py"), str(tmp_path)], cwd=tmp_path, env=env)
    pids = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline and parent.poll() is None:
            pids = [int(p.read_text()) for p in tmp_path.glob("rank_*") if p.read_text()]
            time.sleep(0.2)
        assert len(pids) == 2, "the ranks did not start"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "ranks outlived their killed parent"
    finally:
        parent.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
