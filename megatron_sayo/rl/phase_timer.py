"""Wall time of a training step's named phases (`with timer.phase("rollout"):`), logged as time_<phase>."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Seconds per named phase (a phase entered twice adds up) and since the timer started; `clock` is
    time.perf_counter unless a test passes its own."""

    def __init__(self, phases: tuple[str, ...] = (), clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.durations = dict.fromkeys(phases, 0.0)
        self.start = clock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (also when it raises)."""
        began = self.clock()
        try:
            yield
        finally:
            self.durations[name] = self.durations.get(name, 0.0) + self.clock() - began

    def elapsed(self) -> float:
        """Seconds since the timer started."""
        return self.clock() - self.start

    def metrics(self) -> dict[str, float]:
        """{time_<phase>: seconds} of every phase, declared or entered."""
        return {f"time_{name}": seconds for name, seconds in self.durations.items()}
