"""Continuous batching (eval/scheduler.py) with a stand-in engine: a lone job starts at once, jobs that arrive
while a batch runs form the next batch, a failing batch fails only its own tickets."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_sayo.eval.scheduler import Scheduler


class SlowEngine:
    """Records each batch; the first batch blocks until released."""

    def __init__(self):
        self.batches, self.release, self.started = [], threading.Event(), threading.Event()

    def run_batch(self, jobs, sink=None, cancelled=None):
        self.batches.append([j["id"] for j in jobs])
        self.started.set()
        if len(self.batches) == 1:
            self.release.wait(10)
        if any(j.get("fail") for j in jobs):
            raise RuntimeError("engine failure")
        for k, j in enumerate(jobs):
            sink(k, 0, f"text of {j['id']}")
        return [{"id": j["id"]} for j in jobs]


class Ticket:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def stream(self, choice, text):
        self.events.append(("delta", choice, text))

    def deliver(self, result):
        self.events.append(("done", result))
        self.done.set()

    def fail(self, exc):
        self.events.append(("error", str(exc)))
        self.done.set()


def run_scheduler(engine):
    scheduler = Scheduler(engine, max_batch=8)
    thread = threading.Thread(target=scheduler.serve_forever, daemon=True)
    thread.start()
    return scheduler, thread


@pytest.mark.multiproc
def test_lone_job_starts_at_once_and_waiting_jobs_batch_together():
    engine = SlowEngine()
    scheduler, thread = run_scheduler(engine)
    try:
        first = Ticket()
        t0 = time.monotonic()
        scheduler.submit({"id": "a"}, first)
        assert engine.started.wait(5)
        assert time.monotonic() - t0 < 0.1          # no batching window: started as soon as it was picked up
        later = {name: Ticket() for name in "bcd"}
        for name, ticket in later.items():           # arrive while the engine is busy
            scheduler.submit({"id": name}, ticket)
        engine.release.set()
        for ticket in [first, *later.values()]:
            assert ticket.done.wait(10)
        assert engine.batches == [["a"], ["b", "c", "d"]]
        assert later["c"].events == [("delta", 0, "text of c"), ("done", {"id": "c"})]
    finally:
        scheduler.stopped.set()
        thread.join(10)


@pytest.mark.multiproc
def test_failed_batch_fails_its_tickets_and_the_scheduler_goes_on():
    engine = SlowEngine()
    engine.release.set()
    scheduler, thread = run_scheduler(engine)
    try:
        bad, good = Ticket(), Ticket()
        scheduler.submit({"id": "x", "fail": True}, bad)
        assert bad.done.wait(10) and bad.events == [("error", "engine failure")]
        scheduler.submit({"id": "y"}, good)
        assert good.done.wait(10) and good.events[-1] == ("done", {"id": "y"})
    finally:
        scheduler.stopped.set()
        thread.join(10)
