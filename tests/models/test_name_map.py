"""Conversion kinds: each kind's TP split (Kind.tp_pieces, used by the converters, the dist layout and the
torch loader) against torch.chunk slicing written out per kind, and shard/unshard as inverses."""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.models.qwen25vl.name_map import KINDS, RULES, Rule
from megatron_sayo.models.qwen25vl.weights import shard, unshard


def reference_shard(kind: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Megatron's split per kind, by torch.chunk: row-parallel on dim 1, fc1 as [gate; up] halves each split on
    dim 0, everything column-parallel on dim 0, norms and vision replicated."""
    if kind == "replicated":
        return full
    if kind == "row":
        return full.chunk(tp, dim=1)[rank]
    if kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return full.chunk(tp, dim=0)[rank]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_and_unshard_follow_the_kind(kind, tp):
    full = torch.randn(16, 8)
    rule = Rule("x", ("y",), KINDS[kind])
    shards = [shard(rule, full, r, tp) for r in range(tp)]
    for r, s in enumerate(shards):
        assert torch.equal(s, reference_shard(kind, full, r, tp)), (kind, tp, r)
    assert torch.equal(unshard(rule, shards), full)


def test_every_rule_has_a_kind_and_no_unused_kind():
    assert {r.kind.name for r in RULES} == set(KINDS)


def test_a_split_that_does_not_divide_is_an_error():
    with pytest.raises(ValueError, match="does not split into 2 x 3"):
        KINDS["gate_up"].tp_pieces((8, 4), 3, 0)
