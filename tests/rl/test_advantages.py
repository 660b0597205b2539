"""Group advantages vs a naive loop (statistics.stdev = unbiased, as TRL's torch.std); split over 2 DP ranks."""

import statistics

import pytest
import torch

from megatron_sayo.distributed import runtime
from megatron_sayo.rl.advantages import distributed_group_advantages, group_advantages

EPS = 1e-4


def naive(rewards, ids, eps=EPS):
    out = []
    for r, g in zip(rewards, ids):
        members = [x for x, h in zip(rewards, ids) if h == g]
        std = statistics.stdev(members) if len(members) > 1 else 0.0
        out.append((r - statistics.fmean(members)) / (std + eps))
    return out


def data():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g, dtype=torch.float64)
    ids = torch.tensor([7, 3, 7, 9, 3, 3, 9, 7, 9, 3, 7, 9])  # 3 groups of 4, interleaved, arbitrary ids
    rewards[[3, 6, 8, 11]] = 0.25                                 # group 9: all equal -> advantage 0
    return rewards, ids


def test_matches_naive_loop():
    rewards, ids = data()
    got = group_advantages(rewards, ids)
    torch.testing.assert_close(got, torch.tensor(naive(rewards.tolist(), ids.tolist()), dtype=torch.float64),
                               atol=1e-12, rtol=0)
    assert torch.all(got[ids == 9] == 0)


def test_hand_values_and_singleton_group():
    # group 0: [1, 3] -> mean 2, sample std sqrt(2); group 5: single completion -> 0
    got = group_advantages(torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64), torch.tensor([0, 0, 5]))
    s = 2 ** 0.5
    torch.testing.assert_close(got, torch.tensor([-1 / (s + EPS), 1 / (s + EPS), 0.0], dtype=torch.float64),
                               atol=1e-12, rtol=0)


SPLITS = [5, 0]  # rank 0 holds the first 5 (or none), rank 1 the rest


def _dp2_worker():
    runtime.init_distributed(tp=1, pp=1)  # 2 ranks -> DP = 2
    from megatron.core import parallel_state

    rank = parallel_state.get_data_parallel_rank()
    rewards, ids = data()
    out = []
    for split in SPLITS:
        part = slice(0, split) if rank == 0 else slice(split, None)
        out.append(distributed_group_advantages(rewards[part], ids[part]))
    return out


@pytest.mark.multiproc
def test_split_over_two_dp_ranks_equals_single_process():
    rewards, ids = data()
    want = group_advantages(rewards, ids)
    results = runtime.spawn_local(_dp2_worker, 2)
    for i, split in enumerate(SPLITS):
        got = torch.cat([results[0][i], results[1][i]])
        assert results[0][i].numel() == split
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
