"""heldout_answers' text parsing and breakdowns, on hand-made answers (no model), against direct counts."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from megatron_sayo.experiments.heldout_answers import (
    Answer,
    asked_colour,
    by_word,
    described_colour,
    report_line,
    split_by_description,
)


def test_parsing_follows_the_tiles_reasoning_format():
    assert asked_colour("What is under red?") == "red"
    assert described_colour("green over blue <answer>blue</answer>") == "green"
    assert described_colour("<answer>blue</answer>") is None
    assert described_colour(" over blue") is None


ANSWERS = [Answer("red", "red", "blue", True, 1.0), Answer("red", "blue", "green", False, 3.0),
           Answer("green", "blue", "blue", True, 5.0), Answer("blue", None, None, False, 2.0),
           Answer("blue", "green", "blue", False, 4.0)]


def test_split_counts_accuracy_and_tas_per_part():
    got = split_by_description(ANSWERS)
    assert got["asked_share"] == pytest.approx(1 / 5)
    assert got["asked"] == {"n": 1, "accuracy": 1.0, "tas": 1.0}
    assert got["other"]["n"] == 4 and got["other"]["accuracy"] == pytest.approx(1 / 4)
    assert got["other"]["tas"] == pytest.approx(np.mean([3.0, 5.0, 2.0, 4.0]))
    assert math.isnan(split_by_description([])["asked"]["tas"])


def test_answer_words_are_counted_most_frequent_first():
    got = by_word(ANSWERS)
    counts = collections.Counter(a.word for a in ANSWERS)
    assert list(got)[0] == "blue" and {w: p["n"] for w, p in got.items()} == dict(counts)
    assert got["blue"]["accuracy"] == pytest.approx(2 / 3) and got["blue"]["tas"] == pytest.approx(10 / 3)
    assert got[None] == {"n": 1, "accuracy": 0.0, "tas": 2.0}
    line = report_line("warm-up", ANSWERS, reasoning=True)
    assert line.startswith("| warm-up | 0.400 | 3.000 | 1/5 | 1.00 / 0.25 |") and "blue 3 (3.3)" in line
    assert report_line("x", ANSWERS, reasoning=False).count("|") == 5
