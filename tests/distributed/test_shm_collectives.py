"""Shared-memory TP collectives against gloo's own all_reduce / all_gather (the reference) on two local ranks."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.distributed as dist

from megatron_sayo.distributed import runtime, shm_collectives


def test_usable_ranks_needs_a_core_per_local_rank():
    # two hosts: host 1 has 2 ranks on 2 cores, host 2 has 3 ranks on 2 cores; one rank opted out
    hosts, wanted, cores = [1, 1, 2, 2, 2], [True, False, True, True, True], [2, 2, 2, 2, 2]
    assert shm_collectives.usable_ranks(hosts, wanted, cores) == [True, False, False, False, False]


def _collectives():
    runtime.init_distributed(tp=2)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    group, rank = parallel_state.get_tensor_model_parallel_group(), dist.get_rank()
    assert isinstance(mappings.torch.distributed, shm_collectives.TorchDistributed)
    gen = torch.Generator().manual_seed(100 + rank)
    cases = [torch.randn(1, 16, 64, generator=gen), torch.randn(7, 5, 3, generator=gen).transpose(0, 2),
             torch.randn(4, 33, generator=gen).to(torch.bfloat16), torch.randint(-9, 9, (5, 6), generator=gen)]
    for x in cases:
        expected = x.clone().contiguous()
        dist.all_reduce(expected, group=group)          # gloo
        got = shm_collectives.all_reduce(x.clone(), group)
        assert got.dtype == x.dtype and torch.equal(got, expected), x.shape
    assert shm_collectives._channels[group] is not None, "the shared-memory path was not taken"
    # larger than a slot: gloo does it, same result
    big = torch.full((shm_collectives.SLOT_BYTES // 4 + 1,), float(rank + 1))
    assert torch.equal(shm_collectives.all_reduce(big, group), torch.full_like(big, 3.0))
    # all-gather as megatron calls it (ranks stacked along dim 0)
    x = torch.randn(3, 4, generator=gen)
    out, ref = torch.empty(6, 4), torch.empty(6, 4)
    shm_collectives.all_gather_into_tensor(out, x, group)
    dist.all_gather_into_tensor(ref, x, group=group)
    assert torch.equal(out, ref)
    # as megatron's TP layers call torch.distributed.all_reduce: async handles, and other ops through gloo
    x = torch.tensor([float(rank)])
    assert mappings.torch.distributed.all_reduce(x, group=group, async_op=True).wait() and float(x) == 1.0
    m = torch.tensor([float(rank) + 5])
    mappings.torch.distributed.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    assert float(m) == 6.0
    # many in a row with ranks arriving at random times: the double-buffered slots never mix rounds
    rng = random.Random(rank)
    for i in range(300):
        if rng.random() < 0.1:
            time.sleep(rng.random() * 2e-3)
        got = shm_collectives.all_reduce(torch.full((8,), float(i * 10 + rank)), group)
        assert torch.equal(got, torch.full((8,), float(20 * i + 1))), i
    return True


@pytest.mark.multiproc
def test_shm_all_reduce_and_gather_equal_gloo():
    assert runtime.spawn_local(_collectives, 2, timeout_s=300) == [True, True]


def _late_peer():
    runtime.init_distributed(tp=2)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shm_collectives.all_reduce(torch.ones(4), group)     # the channel exists on both ranks
    shm_collectives.TIMEOUT_S = 0.5
    if dist.get_rank() == 1:
        return "skipped"
    with pytest.raises(RuntimeError, match=r"group ranks \[1\] did not arrive within 0.5 s"):
        shm_collectives.all_reduce(torch.ones(4), group)
    return "timed out"


@pytest.mark.multiproc
def test_a_peer_that_never_arrives_is_an_error_not_a_hang():
    assert runtime.spawn_local(_late_peer, 2, timeout_s=120) == ["timed out", "skipped"]


def _switched_off():
    runtime.init_distributed(tp=2)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    got = shm_collectives.all_reduce(torch.ones(3), group)
    return torch.equal(got, torch.full((3,), 2.0)) and shm_collectives._channels[group] is None


@pytest.mark.multiproc
def test_environment_switch_falls_back_to_gloo(monkeypatch):
    monkeypatch.setenv("MEGATRON_SAYO_SHM_COLLECTIVES", "0")
    assert runtime.spawn_local(_switched_off, 2, timeout_s=120) == [True, True]


def _one_reduce():
    runtime.init_distributed(tp=2)
    from megatron.core import parallel_state

    return float(shm_collectives.all_reduce(torch.ones(1), parallel_state.get_tensor_model_parallel_group()))


@pytest.mark.multiproc
def test_no_segment_is_left_in_dev_shm():
    before = {f for f in os.listdir("/dev/shm") if f.startswith("megatron_sayo_")}
    assert runtime.spawn_local(_one_reduce, 2, timeout_s=120) == [2.0, 2.0]
    assert {f for f in os.listdir("/dev/shm") if f.startswith("megatron_sayo_")} <= before


def _unshared():
    from unittest import mock

    runtime.init_distributed(tp=2)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    # rank 1 cannot see rank 0's segment (as in two containers with their own /dev/shm): both must agree on gloo
    with mock.patch.object(shm_collectives.os.path, "exists", return_value=dist.get_rank() == 0):
        got = shm_collectives.all_reduce(torch.full((3,), float(dist.get_rank())), group)
    return torch.equal(got, torch.ones(3)) and shm_collectives._channels[group] is None


@pytest.mark.multiproc
def test_ranks_that_do_not_share_the_segment_fall_back_to_gloo():
    assert runtime.spawn_local(_unshared, 2, timeout_s=120) == [True, True]


def _name_taken():
    runtime.init_distributed(tp=2)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    squatter = None
    if dist.get_rank() == 0:     # someone else's file already has the name rank 0 will pick
        counter = next(shm_collectives._names)
        shm_collectives._names = iter(range(counter, counter + 10))    # the next channel takes `counter`
        squatter = shm_collectives._segment_path(torch.tensor([os.getpid(), counter]))
        with open(squatter, "wb") as f:
            f.write(b"not ours")
    got = shm_collectives.all_reduce(torch.full((3,), float(dist.get_rank())), group)
    ok = torch.equal(got, torch.ones(3)) and shm_collectives._channels[group] is None
    if squatter is not None:
        with open(squatter, "rb") as f:
            ok = ok and f.read() == b"not ours"     # neither overwritten nor deleted
        os.unlink(squatter)
    return ok


@pytest.mark.multiproc
def test_a_file_already_at_the_segment_name_is_left_alone_and_gloo_is_used():
    assert runtime.spawn_local(_name_taken, 2, timeout_s=120) == [True, True]
