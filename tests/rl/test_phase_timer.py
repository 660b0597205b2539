"""PhaseTimer with a fake clock: named blocks add up, declared phases are always reported, errors still count."""

from __future__ import annotations

import pytest

from megatron_sayo.rl.phase_timer import PhaseTimer


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_are_named_durations():
    clock = FakeClock()
    timer = PhaseTimer(("rollout", "score", "reference"), clock=clock)
    with timer.phase("rollout"):
        clock.now += 2.0
    clock.now += 0.5                      # between phases: in the total, in no phase
    with timer.phase("score"):
        clock.now += 1.0
    with timer.phase("rollout"):          # a second draw adds to the first
        clock.now += 3.0
    assert timer.metrics() == {"time_rollout": 5.0, "time_score": 1.0, "time_reference": 0.0}
    assert timer.elapsed() == 6.5


def test_a_phase_that_raises_is_still_timed():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    with pytest.raises(RuntimeError), timer.phase("update"):
        clock.now += 1.5
        raise RuntimeError
    assert timer.metrics() == {"time_update": 1.5}
