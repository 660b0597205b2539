"""runtime: where a process sits in the job, from torchrun's or Slurm's environment."""

from __future__ import annotations

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


def test_parallel_state_layout_from_spawned_ranks():
    ranks = runtime.spawn_local(_world_info, 4, 2, 1)
    assert sorted(ranks) == [(0, 0, 2), (0, 0, 2), (1, 0, 2), (1, 0, 2)]


def test_world_not_divisible():
    with pytest.raises(ValueError, match="world size 3 is not divisible by tp\\*pp = 2\\*1"):
        runtime.init_distributed(2, 1, launch=runtime.LaunchEnv(0, 3, 0, "127.0.0.1", 1, "torchrun"))
