"""Put on PYTHONPATH of the TP=2 server by tests/eval/test_serve_tp.py (never installed): every process of that
server (the parent and each spawned rank) makes a TAS request whose completion is exactly FAIL_ON_PURPOSE fail
inside its model pass on every rank, as a request that slipped past validation would. Nothing else changes."""

from megatron_sayo.eval import engine as _engine

FAIL_ON_PURPOSE = "fail on purpose"
_score_tas = _engine.Engine.score_tas


def _failing_score_tas(self, job):
    if self.processor.tokenizer.decode(job["completion_ids"]) == FAIL_ON_PURPOSE:
        raise ValueError(f"injected by the test: the completion is {FAIL_ON_PURPOSE!r}")
    return _score_tas(self, job)


_engine.Engine.score_tas = _failing_score_tas
