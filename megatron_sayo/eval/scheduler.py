"""The server's batch scheduler (rank 0's main thread): continuous batching over a job queue.

HTTP handlers put (job, ticket) pairs on the queue. When the engine is idle, the first job starts at once
together with whatever else is already waiting (no batching window: a lone client never waits for company);
while a batch runs, new jobs queue up and all of them (up to max_batch) form the next batch. Under TP/PP the
batch is broadcast to the other ranks, which run it in lockstep (`follower_loop`); an idle heartbeat keeps the
process group alive.

A ticket is anything with `stream(choice, text)`, `deliver(result)` and `fail(exc)`; they are called from
this thread (the HTTP side hands them over to its event loop).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

log = logging.getLogger("megatron_sayo.serve")
HEARTBEAT_S = 30.0


class Scheduler:
    """A job queue drained in batches by `serve_forever` (rank 0); `submit` is called from any thread."""

    def __init__(self, engine, max_batch: int = 32, broadcast=None):
        self.engine, self.max_batch = engine, max_batch
        self.broadcast = broadcast or (lambda batch: batch)
        self.queue: queue.Queue = queue.Queue()
        self.stopped = threading.Event()

    def submit(self, job: dict, ticket) -> None:
        """Queue a job; its ticket receives the streamed text and the result (or the engine's exception)."""
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
        return batch

    def run(self, batch: list) -> None:
        """Run one batch on every rank; deliver each result (or the failure) to its ticket."""
        jobs = [job for job, _ in batch]
        try:
            results = self.engine.run_batch(self.broadcast(jobs),
                                            sink=lambda j, choice, text: batch[j][1].stream(choice, text))
        except Exception as exc:  # a failed batch fails its requests, not the server
            log.exception("batch of %d jobs failed", len(jobs))
            for _, ticket in batch:
                ticket.fail(exc)
            return
        for (_, ticket), result in zip(batch, results):
            ticket.deliver(result)

    def serve_forever(self) -> None:
        """Run batches until `stopped` is set; then tell the other ranks to stop."""
        last = time.monotonic()
        while not self.stopped.is_set():
            batch = self.next_batch(first_wait=0.2)
            if batch:
                self.run(batch)
                last = time.monotonic()
            elif time.monotonic() - last > HEARTBEAT_S:
                self.broadcast([])
                last = time.monotonic()
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
    """Ranks other than 0: run every batch rank 0 broadcasts, until it sends None."""
    while True:
        jobs = broadcast(None)
        if jobs is None:
            return
        if jobs:
            engine.run_batch(jobs)
