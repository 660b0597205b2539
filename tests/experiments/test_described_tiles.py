"""described_tiles' text parsing and split, on hand-made completions (no model)."""

from __future__ import annotations

import math

import pytest

from megatron_sayo.experiments.described_tiles import asked_colour, described_colour, split_by_description


def test_parsing_follows_the_tiles_reasoning_format():
    assert asked_colour("What is under red?") == "red"
    assert described_colour("green over blue <answer>blue</answer>") == "green"
    assert described_colour("<answer>blue</answer>") is None
    assert described_colour(" over blue") is None


def test_split_counts_accuracy_and_tas_per_part():
    rows = [("red", "red", True, 1.0), ("red", "blue", False, 3.0), ("green", "blue", True, 5.0),
            ("blue", None, False, 2.0)]
    got = split_by_description(rows)
    assert got["asked_share"] == pytest.approx(0.25)
    assert got["asked"] == {"n": 1, "accuracy": 1.0, "tas": 1.0}
    assert got["other"]["n"] == 3 and got["other"]["accuracy"] == pytest.approx(1 / 3)
    assert got["other"]["tas"] == pytest.approx(10 / 3)
    assert math.isnan(split_by_description([])["asked"]["tas"])
