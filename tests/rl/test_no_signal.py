"""A GRPO step whose groups all have equal rewards (zero advantages, so zero loss and gradients) is warned about
with the count of groups, and every step records how many of its groups gave no signal."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from megatron_sayo.rl.trainer import GRPOTrainer


def fake_trainer(groups: int):
    return SimpleNamespace(dp=1, step=6, is_logger=True,
                           cfg=SimpleNamespace(train=SimpleNamespace(global_batch=groups)))


def test_all_flat_groups_warn_with_the_count(caplog):
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    with caplog.at_level(logging.WARNING, logger="megatron_sayo.train"):
        out = GRPOTrainer._no_signal(fake_trainer(3), torch.tensor([1.0, 1.0, 0.5, 0.5, 2.0, 2.0]), ids)
    assert out == {"groups_no_signal": 3, "groups": 3}
    assert [r.getMessage() for r in caplog.records] == [
        "step 7: all 3 groups have zero reward variance (every completion of a prompt got the same reward): no "
        "learning signal, so loss, KL and gradients are 0"]


def test_one_group_with_spread_is_counted_not_warned(caplog):
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    with caplog.at_level(logging.WARNING, logger="megatron_sayo.train"):
        out = GRPOTrainer._no_signal(fake_trainer(3), torch.tensor([1.0, 1.0, 0.5, 0.7, 2.0, 2.0]), ids)
    assert out == {"groups_no_signal": 2, "groups": 3} and caplog.records == []
