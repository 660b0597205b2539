"""OpenAI-compatible HTTP server over our Qwen2.5-VL model (stdlib http.server, no web framework).

    python -m megatron_sayo.eval.serve --hf DIR | --megatron DIR [--tp N] [--pp N] [--host 127.0.0.1]
        --port P [--api-key KEY] [--batch-window-ms 20] [--max-batch 32]

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health (with batching stats), and
POST /v1/tas (ours): teacher-force a completion after a grounded prompt and return its TAS (see engine.py).

Batching: HTTP threads validate a request and put a job on a queue; the scheduler (main thread of rank 0)
takes the first waiting job, collects whatever else arrives within the batch window (and everything that queued
up while the previous batch was generating), and runs them together. Under TP/PP rank 0 broadcasts each batch to
the other ranks, which run the same batch in lockstep; an idle heartbeat keeps the process group alive.
With --tp/--pp > 1 and no torchrun/Slurm environment, the ranks are spawned locally.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron_sayo.eval.openai_api import ApiError, Limits, parse_chat_request, parse_tas_request

log = logging.getLogger("megatron_sayo.serve")
MAX_BODY = 64 << 20
HEARTBEAT_S = 30.0
REQUEST_TIMEOUT_S = 3600.0


# ------------------------------------------------------------------------------------------------ scheduler

class Scheduler:
    """A job queue drained in batches by `serve_forever` (rank 0); `submit` is called from HTTP threads."""

    def __init__(self, engine, window_s: float = 0.02, max_batch: int = 32, broadcast=None):
        self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
        self.broadcast = broadcast or (lambda batch: batch)
        self.queue: queue.Queue = queue.Queue()
        self.stopped = threading.Event()

    def submit(self, job: dict) -> dict:
        """Queue a job and wait for its result (raises what the engine raised)."""
        future: Future = Future()
        self.queue.put((job, future))
        return future.result(timeout=REQUEST_TIMEOUT_S)

    def next_batch(self, first_wait: float) -> list:
        """The first waiting (job, future) plus what arrives within the window, at most max_batch."""
        try:
            batch = [self.queue.get(timeout=first_wait)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=max(left, 0.0)) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def serve_forever(self) -> None:
        """Run batches until `stopped` is set; then tell the other ranks to stop."""
        last = time.monotonic()
        while not self.stopped.is_set():
            batch = self.next_batch(first_wait=0.2)
            if not batch:
                if time.monotonic() - last > HEARTBEAT_S:
                    self.broadcast([])
                    last = time.monotonic()
                continue
            jobs = [job for job, _ in batch]
            try:
                results = self.engine.run_batch(self.broadcast(jobs))
                for (_, future), result in zip(batch, results):
                    future.set_result(result)
            except Exception as exc:  # a failed batch fails its requests, not the server
                log.exception("batch of %d jobs failed", len(jobs))
                for _, future in batch:
                    future.set_exception(exc)
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


# ------------------------------------------------------------------------------------------------ HTTP

class ServerState:
    """What the HTTP handlers need: scheduler, processor, limits, model name, API key."""

    def __init__(self, scheduler: Scheduler, processor, limits: Limits, model_name: str, api_key: str | None):
        self.scheduler, self.processor, self.limits = scheduler, processor, limits
        self.model_name, self.api_key = model_name, api_key
        self.started = int(time.time())


def chat_response(result: dict, model: str) -> dict:
    """The OpenAI chat.completion object for an engine result."""
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"], "logprobs": None} for c in result["choices"]]
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}


class Handler(BaseHTTPRequestHandler):
    """Routes; every failure becomes OpenAI-style error JSON."""

    server_version = "megatron-sayo"
    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> ServerState:
        return self.server.state  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # quiet by default
        log.debug("%s " + fmt, self.address_string(), *args)

    def send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, err: ApiError) -> None:
        self.send_json(err.status, err.body())

    def authorised(self) -> bool:
        key = self.state.api_key
        if key is None or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self.send_error_json(ApiError("invalid or missing API key (send 'Authorization: Bearer KEY')", None,
                                      "invalid_api_key", 401, "authentication_error"))
        return False

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            stats = vars(self.state.scheduler.engine.stats)
            return self.send_json(200, {"status": "ok", "model": self.state.model_name, "queued":
                                        self.state.scheduler.queue.qsize(), **stats})
        if not self.authorised():
            return
        if path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [{
                "id": self.state.model_name, "object": "model", "created": self.state.started,
                "owned_by": "megatron_sayo"}]})
        self.send_error_json(ApiError(f"no route GET {path}", None, "not_found", 404))

    def read_json(self):
        """The request body as JSON, or ApiError."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError("bad Content-Length header") from None
        if length <= 0:
            raise ApiError("empty request body: send a JSON object")
        if length > MAX_BODY:
            raise ApiError(f"request body of {length} bytes exceeds {MAX_BODY}", None, "request_too_large", 413)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"request body is not valid JSON: {exc}", None, "invalid_json") from None

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            body = self.read_json()  # read first so the connection stays usable after an error
        except ApiError as err:
            self.close_connection = True
            return self.send_error_json(err)
        if not self.authorised():
            return
        try:
            if path == "/v1/chat/completions":
                job = parse_chat_request(body, self.state.processor, self.state.limits)
                return self.send_json(200, chat_response(self.state.scheduler.submit(job), self.state.model_name))
            if path == "/v1/tas":
                hf = self.state.scheduler.engine.hf
                job = parse_tas_request(body, self.state.processor, self.state.limits, hf.tokens.image,
                                        hf.vision.spatial_merge_size, hf.vision.patch_size)
                generated = self.state.scheduler.engine.generated_ids(job["ids"], body["completion"])
                if generated is not None:
                    job.update(completion_ids=generated, source="generated")
                return self.send_json(200, self.state.scheduler.submit(job))
            raise ApiError(f"no route POST {path}", None, "not_found", 404)
        except ApiError as err:
            self.send_error_json(err)
        except Exception as exc:  # engine failure: 500, keep serving
            log.exception("request failed")
            self.send_error_json(ApiError(f"internal error: {type(exc).__name__}: {exc}", None, "internal_error",
                                          500, "server_error"))


def start_http(state: ServerState, host: str, port: int) -> ThreadingHTTPServer:
    """Bind and serve HTTP in a daemon thread."""
    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    return httpd


# ------------------------------------------------------------------------------------------------ main

def build_engine(args):
    """Model + processor of this rank (parallel_state initialised)."""
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.eval.engine import Engine, processor_dir
    from megatron_sayo.checkpoint.loader import load_model_stage

    model = load_model_stage(args.hf, args.megatron, tp=args.tp, pp=args.pp)
    return Engine(model, Processor.from_pretrained(processor_dir(args.hf, args.megatron)))


def run_rank(args) -> None:
    """One rank: rank 0 serves HTTP and schedules; the others follow its broadcasts."""
    import signal

    import torch.distributed as dist

    from megatron_sayo.distributed import runtime

    runtime.init_distributed(args.tp, args.pp)
    engine = build_engine(args)
    broadcast = make_broadcast()
    if dist.get_rank() != 0:
        return follower_loop(engine, broadcast)
    scheduler = Scheduler(engine, args.batch_window_ms / 1000.0, args.max_batch, broadcast)
    limits = Limits(max_len=min(engine.max_len, args.max_model_len or engine.max_len),
                    max_tokens=args.max_tokens_limit)
    name = args.model_name or os.path.basename(os.path.normpath(args.hf or args.megatron))
    httpd = start_http(ServerState(scheduler, engine.processor, limits, name, args.api_key), args.host, args.port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: scheduler.stopped.set())
    print(f"serving {name} on http://{args.host}:{httpd.server_address[1]}/v1 (tp={args.tp}, pp={args.pp})",
          flush=True)
    try:
        scheduler.serve_forever()
    finally:
        httpd.shutdown()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="OpenAI-compatible server over a Qwen2.5-VL checkpoint.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF checkpoint dir")
    src.add_argument("--megatron", help="megatron checkpoint dir (converted, step dir or run dir)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key", default=os.environ.get("SAYO_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: dir name)")
    p.add_argument("--batch-window-ms", type=float, default=20.0, help="how long to collect requests into a batch")
    p.add_argument("--max-batch", type=int, default=32, help="most requests per batch")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion bound (default: model's)")
    args = p.parse_args(argv)
    for name in ("tp", "pp", "max_batch", "max_tokens_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    world = args.tp * args.pp
    if world > 1 and "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ:
        from megatron_sayo.distributed.runtime import spawn_local

        spawn_local(run_rank, world, args, timeout_s=float("inf"))
    else:
        if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ and "MASTER_PORT" not in os.environ:
            from megatron_sayo.distributed.runtime import free_port

            os.environ["MASTER_PORT"] = str(free_port())   # never collide with another job's default port
        run_rank(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
