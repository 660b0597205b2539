"""The model side of the server: batched chat generation and teacher-forced TAS scoring, on every TP/PP rank.

Rank 0 owns the HTTP front end and a queue of jobs; `Engine.run_batch` is called on every rank with the same
list of jobs (rank 0 broadcasts it), so all ranks run `generate` / `score_policy` in lockstep.

One request never fails another: sampling never emits a vision placeholder (fed back, it would need pixels);
a generate call that raises is re-run one job at a time, so only the job that fails alone gets an error
(every rank re-runs the same way, so the ranks stay in lockstep); an error of the ranks' communication
(`ranks_broken`) is not retried but raised. A client that left (`cancelled(job)` on rank 0, shared with
the other ranks each decode step) has its rows ended at the next step.

A job is a plain dict (picklable, broadcast as an object):
  chat: {"kind": "chat", "ids": [int], "pixel_values": Tensor|None, "image_grid_thw": Tensor|None,
         "params": (temperature, top_p, greedy, max_tokens, n, seed), "stop": [str],
         "logprobs": None | top-k, "stream": bool, "include_usage": bool}
  tas:  {"kind": "tas", "ids": [int], "completion_ids": [int], "pixel_values", "image_grid_thw",
         "region_mask": bool Tensor [P], "temperature": float}
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_sayo.config import RewardConfig
from megatron_sayo.eval.errors import ApiError

log = logging.getLogger("megatron_sayo.serve")


GENERATED_CACHE = 20_000


def processor_dir(hf_dir: str | None, megatron_dir: str | None) -> Path:
    """Where the tokenizer / preprocessor files live (megatron checkpoints carry copies of them)."""
    if hf_dir is not None:
        return Path(hf_dir)
    from megatron_sayo.checkpoint.files import resolve_checkpoint_dir

    return resolve_checkpoint_dir(megatron_dir)


def chat_key(job: dict) -> tuple:
    """Jobs with equal keys share one `generate` call (same sampling settings, n and log-prob request)."""
    temperature, top_p, greedy, _max_tokens, n, seed = job["params"]
    return (temperature, top_p, greedy, n, seed, job.get("logprobs") is not None)


def ranks_broken(exc: BaseException) -> bool:
    """True for a failure of the ranks' communication (after which they cannot go on together)."""
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(k in text for k in ("gloo", "nccl", "connection closed",
                                                                       "connection reset", "broken pipe"))


def request_error(exc: Exception) -> ApiError:
    """The error a request gets when its own generation failed (its neighbours in the batch are unaffected)."""
    if isinstance(exc, ApiError):
        return exc
    return ApiError(f"generation failed for this request: {type(exc).__name__}: {exc}", None, "generation_failed",
                    500, "server_error")


@dataclass
class StreamLedger:
    """Text streamed so far per (job, choice), so a re-run of a job after a neighbour's failure streams only
    text not sent yet; `diverged` tells when the re-run's text no longer extends what the client already has."""

    sink: object
    sent: dict = field(default_factory=dict)
    attempt: dict = field(default_factory=dict)

    def restart(self) -> None:
        self.attempt = {}

    def __call__(self, job: int, choice: int, text: str) -> None:
        key = (job, choice)
        now = self.attempt[key] = self.attempt.get(key, "") + text
        before = self.sent.get(key, "")
        if len(now) > len(before) and now.startswith(before):
            self.sink(job, choice, now[len(before):])
            self.sent[key] = now

    def diverged(self, job: int, result: dict) -> bool:
        return any(not c["text"].startswith(self.sent.get((job, c["index"]), "")) for c in result["choices"])


def share_flags(flags: list[bool]) -> list[bool]:
    """Rank 0's flags on every rank (a max all-reduce; the other ranks pass zeros); identity on one process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1 or not flags:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


@dataclass
class RowState:
    """One completion row of a generate call: its job, choice index, limits and what was streamed."""

    job: int
    choice: int
    limit: int
    stops: list[str]
    stream: bool
    sent: str = ""


@dataclass
class EngineStats:
    """What the server has done: generate calls, requests, and the largest batch (in requests)."""

    batches: int = 0
    requests: int = 0
    max_batch_requests: int = 0
    tas_requests: int = 0
    generated_tokens: int = 0
    failed_requests: int = 0
    cancelled_requests: int = 0


class Engine:
    """Holds the model and processor of one rank; turns job lists into results (results used on rank 0)."""

    def __init__(self, model, processor, reward: RewardConfig | None = None):
        self.model = model
        self.processor = processor
        self.hf = model.hf
        self.reward = reward or RewardConfig()
        self.stats = EngineStats()
        self.generated: OrderedDict = OrderedDict()   # (prompt ids, text) -> completion ids, for exact TAS

    def remember(self, prompt_ids: list[int], text: str, ids: list[int]) -> None:
        """Keep a generated completion's ids so /v1/tas can teacher-force exactly those (bounded LRU)."""
        self.generated[(hash(tuple(prompt_ids)), text)] = ids
        while len(self.generated) > GENERATED_CACHE:
            self.generated.popitem(last=False)

    def generated_ids(self, prompt_ids: list[int], text: str) -> list[int] | None:
        """The ids this server generated for (prompt, text), if it still remembers them."""
        return self.generated.get((hash(tuple(prompt_ids)), text))

    @property
    def max_len(self) -> int:
        """Longest prompt + completion the model accepts (its max_position_embeddings)."""
        return int(self.hf.text.max_position_embeddings)

    def run_batch(self, jobs: list[dict], sink=None, cancelled=None) -> list[dict | ApiError]:
        """Results for `jobs` in order (an ApiError for a job that failed on its own): chat jobs grouped by
        sampling key, TAS jobs one by one. Rank 0 only: `sink(job index, choice, text)` receives streamed text
        of jobs that asked for it, `cancelled(job index)` tells which clients have left."""
        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            if job["kind"] == "chat":
                groups.setdefault(chat_key(job), []).append(i)
            else:
                results[i] = self._isolated(lambda job=job: [self.score_tas(job)], 1)[0]
        ledger = None if sink is None else StreamLedger(sink)
        for idx in groups.values():
            for i, res in zip(idx, self._chat_group(jobs, idx, ledger, cancelled)):
                results[i] = res
        return results

    def _isolated(self, run, n: int) -> list:
        """run() (n results), or n request errors when it raises anything but a communication failure."""
        try:
            return run()
        except Exception as exc:
            if ranks_broken(exc):
                raise
            log.warning("a request failed on its own: %s: %s", type(exc).__name__, exc)
            self.stats.failed_requests += n
            return [request_error(exc)] * n

    def _chat_group(self, jobs: list[dict], idx: list[int], ledger, cancelled) -> list:
        """generate_chat over the jobs `idx`; when it fails and holds several jobs, each job again on its own."""
        def run(group):
            if ledger is not None:
                ledger.restart()
            local = None if ledger is None else (lambda j, c, text: ledger(group[j], c, text))
            gone = None if cancelled is None else (lambda j: cancelled(group[j]))
            out = self.generate_chat([jobs[i] for i in group], local, gone)
            if ledger is not None:
                out = [ApiError("the request's generation was re-run after another request in its batch failed, "
                                "and the re-run no longer matches the text already streamed", None,
                                "generation_failed", 500, "server_error") if ledger.diverged(i, r) else r
                       for i, r in zip(group, out)]
            return out

        if len(idx) == 1:
            return self._isolated(lambda: run(idx), 1)
        try:
            return run(idx)
        except Exception as exc:
            if ranks_broken(exc):
                raise
            log.warning("a batch of %d requests failed (%s: %s); running each on its own", len(idx),
                        type(exc).__name__, exc)
        return [self._isolated(lambda i=i: run([i]), 1)[0] for i in idx]

    # ------------------------------------------------------------------------------------------------ chat
    def batch_inputs(self, jobs: list[dict]) -> dict:
        """Left-padded processor batch of the jobs' prompts (images concatenated in job order)."""
        ids, mask = self.processor.pad([j["ids"] for j in jobs], "left")
        pix = [j["pixel_values"] for j in jobs if j["pixel_values"] is not None]
        grids = [j["image_grid_thw"] for j in jobs if j["image_grid_thw"] is not None]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pix) if pix else None,
                "image_grid_thw": torch.cat(grids) if grids else None}

    def generate_chat(self, jobs: list[dict], sink=None, cancelled=None) -> list[dict]:
        """One `generate` call for jobs sharing a sampling key; each gets n choices cut at its own limits.

        Rows end at their job's max_tokens or stop string (every rank decides the same from the shared ids), or
        when `cancelled(job)` (rank 0; shared each step) says the client left; vision ids are never sampled.
        `sink(job, choice, text)` (rank 0) receives streamed text as it settles."""
        from megatron_sayo.distributed.runtime import device
        from megatron_sayo.inference.decode import generate
        from megatron_sayo.inference.sampling import SamplingParams

        temperature, top_p, greedy, _, n, seed = jobs[0]["params"]
        k = max((j.get("logprobs") or 0) for j in jobs) if jobs[0].get("logprobs") is not None else None
        rows = [RowState(j, c, job["params"][3], job.get("stop") or [], bool(job.get("stream")) and sink is not None)
                for j, job in enumerate(jobs) for c in range(n)]
        params = SamplingParams(temperature=temperature if not greedy else 1.0, top_p=top_p,
                                max_new_tokens=max(r.limit for r in rows), greedy=greedy, seed=seed,
                                suppress_token_ids=self.hf.tokens.vision)
        batch = {key: (v.to(device()) if torch.is_tensor(v) else v) for key, v in self.batch_inputs(jobs).items()}
        gone: set[int] = set()

        def on_step(live, tokens, lengths):
            flags = share_flags([bool(cancelled and cancelled(j)) for j in range(len(jobs))])
            gone.update(j for j, f in enumerate(flags) if f)
            return self._step(rows, live, tokens, lengths, sink, gone)

        rollout = generate(self.model, batch, params, num_return_sequences=n, top_logprobs=k, on_step=on_step)
        self.stats.cancelled_requests += len(gone)
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        self.stats.max_batch_requests = max(self.stats.max_batch_requests, len(jobs))
        out = []
        for j, job in enumerate(jobs):
            choices = [self._choice(rollout, j * n + c, c, job) for c in range(n)]
            out.append({"choices": choices, "prompt_tokens": len(job["ids"]),
                        "completion_tokens": sum(c["tokens"] for c in choices)})
        self.stats.generated_tokens += sum(r["completion_tokens"] for r in out)
        return out

    def _step(self, rows: list[RowState], live: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
              sink, gone: set[int] = frozenset()) -> torch.Tensor:
        """generate's on_step: end rows at their max_tokens or stop string, or whose client left (`gone`);
        stream their settled text."""
        from megatron_sayo.eval.textstream import settled_text, truncate_at_stop

        halt = torch.zeros(live.numel(), dtype=torch.bool)
        for i, r in enumerate(live.tolist()):
            row, length = rows[r], int(lengths[r])
            halt[i] = length >= row.limit or row.job in gone
            if row.job in gone or not (row.stops or row.stream):
                continue
            text = self.processor.tokenizer.decode(tokens[r, :length].tolist(), skip_special_tokens=True)
            if row.stops and truncate_at_stop(text, row.stops)[1]:
                halt[i] = True
            if row.stream:
                settled = settled_text(text, row.stops)
                if len(settled) > len(row.sent) and settled.startswith(row.sent):
                    sink(row.job, row.choice, settled[len(row.sent):])
                    row.sent = settled
        return halt.to(live.device)

    def _choice(self, rollout, row: int, index: int, job: dict) -> dict:
        """One OpenAI choice from rollout row `row`: text cut at the stop string, finish reason, log-probs."""
        from megatron_sayo.eval.textstream import truncate_at_stop

        limit = job["params"][3]
        length = min(int(rollout.completion_lengths[row]), limit)
        ids = rollout.completion_ids[row, :length].tolist()
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        text, hit = truncate_at_stop(text, job.get("stop") or [])
        eos = bool(ids) and ids[-1] in self.hf.tokens.eos
        if not hit:
            self.remember(job["ids"], text, ids)
        choice = {"index": index, "text": text, "finish_reason": "stop" if hit or eos else "length",
                  "tokens": length}
        if job.get("logprobs") is not None:
            choice["logprobs"] = self._logprobs(rollout, row, ids, job["logprobs"])
        return choice

    def _logprobs(self, rollout, row: int, ids: list[int], k: int) -> list[dict]:
        """OpenAI `logprobs.content`: per generated token its text, bytes, log-prob and the top-k alternatives."""
        def entry(token_id: int, logprob: float) -> dict:
            text = self.processor.tokenizer.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        out = []
        for t, token_id in enumerate(ids):
            item = entry(token_id, float(rollout.raw_logprobs[row, t]))
            item["top_logprobs"] = [entry(int(a), float(b)) for a, b in
                                    zip(rollout.top_ids[row, t, :k].tolist(),
                                        rollout.top_logprobs[row, t, :k].tolist())]
            out.append(item)
        return out

    # ------------------------------------------------------------------------------------------------ TAS
    def score_tas(self, job: dict) -> dict:
        """Teacher-force a completion after its prompt: TAS and attention reward (docs/spec.md §3) of that sample."""
        from megatron_sayo.distributed.runtime import device
        from megatron_sayo.rl.batch import ScoringBatch
        from megatron_sayo.rl.rewards import sequence_attention_reward
        from megatron_sayo.rl.scoring import score_policy

        batch = ScoringBatch.from_completion(self.hf, job["ids"], job["completion_ids"], job["pixel_values"],
                                             job["image_grid_thw"], job["region_mask"], device())
        scores = score_policy(self.model, batch, micro_batch=1, temperature=job["temperature"])
        self.stats.tas_requests += 1
        if scores is None:
            return {}
        cfg = self.reward
        reward, tas, selected = sequence_attention_reward(scores, cfg.top_entropy_ratio, cfg.attention_form, cfg.eps)
        return {"tas": float(tas[0]), "reward_attention": float(reward[0]),
                "completion_tokens": int(scores.mask.sum()), "selected_tokens": int(selected.sum()),
                "region_tokens": int(batch.region_mask.sum()), "completion_source": job.get("source", "tokenized")}
