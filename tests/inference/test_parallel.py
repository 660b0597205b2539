"""Generation's parallel plumbing that runs without a process group."""

from __future__ import annotations

import pytest
import torch


def test_sequence_parallel_off_switches_and_restores():
    """Megatron layers cache config.sequence_parallel at init (the local CPU spec cannot build SP at all):
    every cached copy and config is off inside, restored after, even on error."""
    from types import SimpleNamespace

    from megatron_sayo.inference.parallel import sequence_parallel_off

    config = SimpleNamespace(sequence_parallel=True)
    inner = torch.nn.Linear(2, 2)
    inner.sequence_parallel, inner.config = True, config
    plain = torch.nn.Linear(2, 2)
    plain.sequence_parallel = False
    model = torch.nn.Sequential(inner, plain)
    model.config = config
    with pytest.raises(RuntimeError), sequence_parallel_off(model):
        assert not inner.sequence_parallel and not config.sequence_parallel and not plain.sequence_parallel
        raise RuntimeError
    assert inner.sequence_parallel and config.sequence_parallel and not plain.sequence_parallel
