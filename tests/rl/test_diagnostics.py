"""Within-group steering diagnostics against numpy: per-group sample std, Pearson correlation of group-centred
values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sayo.rl.diagnostics import mean_group_std, steering_metrics, within_group_corr


def numpy_centred(x, ids):
    return np.concatenate([x[ids == g] - x[ids == g].mean() for g in np.unique(ids)])


def test_against_numpy():
    rng = np.random.default_rng(0)
    ids = np.repeat([7, 3, 11], 5)
    x, y = rng.normal(size=15), rng.normal(size=15)
    y[ids == 3] += 10.0        # a group offset must not create correlation
    ref_std = np.mean([np.std(x[ids == g], ddof=1) for g in np.unique(ids)])
    assert mean_group_std(torch.tensor(x), torch.tensor(ids)) == pytest.approx(ref_std, rel=1e-12)
    order = np.argsort(ids, kind="stable")
    ref_corr = np.corrcoef(numpy_centred(x[order], ids[order]), numpy_centred(y[order], ids[order]))[0, 1]
    assert within_group_corr(torch.tensor(x), torch.tensor(y), torch.tensor(ids)) == pytest.approx(ref_corr, rel=1e-12)


def test_no_spread_gives_zero_correlation():
    ids = torch.tensor([0, 0, 1, 1])
    flat = torch.tensor([1.0, 1.0, 2.0, 2.0])
    assert within_group_corr(flat, torch.tensor([0.1, 0.5, 0.2, 0.9]), ids) == 0.0
    m = steering_metrics(flat, flat, torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.zeros(4), ids)
    assert m["attention_group_std"] == 0.0 and m["adv_tas_corr"] == 0.0
