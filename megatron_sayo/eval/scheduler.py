"""The server's batch scheduler (rank 0's main thread): continuous batching over a job queue.

HTTP handlers put (job, ticket) pairs on the queue. When the engine is idle, the first job starts at once
together with whatever else is already waiting (no batching window: a lone client never waits for company);
while a batch runs, new jobs queue up and all of them (up to max_batch) form the next batch. Under TP/PP the
batch is broadcast to the other ranks, which run it in lockstep (`follower_loop`); an idle heartbeat keeps the
process group alive.

A ticket is anything with `stream(choice, text)`, `deliver(result)` and `fail(exc)`; they are called from
this thread (the HTTP side hands them over to its event loop). A ticket whose `cancelled` is true (its
client left) is dropped from the queue, or its rows end at the engine's next decode step.

A request that fails on its own gets its error (the engine isolates it; the batch's other requests complete).
When the ranks can no longer work together (`ranks_broken`), the scheduler records the reason in `failure`
(/health reports it), fails every waiting request with it and stops, and the server exits; a follower rank
exits at once with the reason, and its launcher takes the other ranks down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from megatron_sayo.eval.engine import ranks_broken
from megatron_sayo.eval.errors import ApiError

log = logging.getLogger("megatron_sayo.serve")
HEARTBEAT_S = 30.0


class Scheduler:
    """A job queue drained in batches by `serve_forever` (rank 0); `submit` is called from any thread."""

    def __init__(self, engine, max_batch: int = 32, broadcast=None, stopped=None):
        self.engine, self.max_batch = engine, max_batch
        self.broadcast = broadcast or (lambda batch: batch)
        self.queue: queue.Queue = queue.Queue()
        self.stopped = stopped if stopped is not None else threading.Event()
        self.failure: str | None = None     # why the server stopped serving, once it has

    def unavailable(self) -> ApiError:
        """The error every request gets once the server has failed."""
        return ApiError(f"the server has stopped: {self.failure}", None, "server_failed", 503, "server_error")

    def submit(self, job: dict, ticket) -> None:
        """Queue a job; its ticket receives the streamed text and the result (or the engine's exception)."""
        if self.failure is not None:
            ticket.fail(self.unavailable())
            return
        self.queue.put((job, ticket))

    def next_batch(self, first_wait: float) -> list:
        """The first waiting (job, ticket) plus everything already queued behind it, at most max_batch."""
        try:
            batch = [self.queue.get(timeout=first_wait)]
        except queue.Empty:
            return []
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return [(job, ticket) for job, ticket in batch if not getattr(ticket, "cancelled", False)]

    def run(self, batch: list) -> None:
        """Run one batch on every rank; deliver each result (or its own failure) to its ticket."""
        jobs = [job for job, _ in batch]
        try:
            results = self.engine.run_batch(self.broadcast(jobs),
                                            sink=lambda j, choice, text: batch[j][1].stream(choice, text),
                                            cancelled=lambda j: getattr(batch[j][1], "cancelled", False))
        except Exception as exc:
            log.exception("batch of %d jobs failed", len(jobs))
            if ranks_broken(exc):
                return self.fail_all(batch, f"{type(exc).__name__}: {exc}")
            for _, ticket in batch:        # every rank raised the same: the server goes on
                ticket.fail(exc)
            return
        for (_, ticket), result in zip(batch, results):
            if isinstance(result, Exception):
                ticket.fail(result)
            else:
                ticket.deliver(result)

    def fail_all(self, batch: list, reason: str) -> None:
        """Record why the server cannot go on; fail this batch and everything queued; stop serving."""
        self.failure = reason
        self.stopped.set()
        log.error("the ranks can no longer work together, the server stops: %s", reason)
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for _, ticket in batch:
            ticket.fail(self.unavailable())

    def serve_forever(self) -> None:
        """Run batches until `stopped` is set; then tell the other ranks to stop."""
        last = time.monotonic()
        while not self.stopped.is_set():
            batch = self.next_batch(first_wait=0.2)
            if batch:
                self.run(batch)
                last = time.monotonic()
            elif time.monotonic() - last > HEARTBEAT_S:
                try:
                    self.broadcast([])
                except Exception as exc:
                    self.fail_all([], f"{type(exc).__name__}: {exc}")
                last = time.monotonic()
        if self.failure is None:
            self.broadcast(None)


def make_broadcast():
    """Object broadcast from global rank 0 to all ranks (identity when there is one process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return lambda obj: obj

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return broadcast


def follower_loop(engine, broadcast) -> None:
    """Ranks other than 0: run every batch rank 0 broadcasts, until it sends None. A batch that fails here
    failed the same way on every rank (rank 0 answers its requests with the error): go on; a failure of the
    ranks' communication ends this rank with the reason."""
    while True:
        jobs = broadcast(None)
        if jobs is None:
            return
        if not jobs:
            continue
        try:
            engine.run_batch(jobs)
        except Exception as exc:
            if ranks_broken(exc):
                raise RuntimeError(f"serving rank stops: the ranks can no longer work together: {exc}") from exc
            log.exception("batch of %d jobs failed (as on rank 0); going on", len(jobs))
