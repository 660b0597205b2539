"""OpenAI-compatible server over our Qwen2.5-VL model: Starlette app (api_server.py) on uvicorn.

    python -m megatron_sayo.eval.serve --hf DIR | --megatron DIR [--tp N] [--pp N] --port P [--api-key KEY]
        [--allowed-local-media-path DIR] [limits: see --help and README "Security and limits"]

Why uvicorn + Starlette: a maintained ASGI server (the one vLLM's and SGLang's OpenAI servers run on) gives by
configuration what a hand-written http.server lacks: an asyncio event loop instead of a thread per
connection, a listen backlog, a connection cap (503 beyond it), keep-alive timeouts, bounded header sizes and
streaming responses (server-sent events). Starlette rather than FastAPI: the API is five routes whose
validation must answer in OpenAI's error format (openai_api.py does it), so FastAPI's pydantic layer would add
a dependency and a second validation path for nothing.

Prompts: the server applies the chat template to the messages exactly as sent and adds nothing. Training put
`data.instruction` on its own line after each question ("Look at the image, think briefly, then give the final
answer as <answer>...</answer>." unless the run's config.yaml says otherwise), and a model trained here answers
well only when a client does the same: send "QUESTION\nINSTRUCTION" as the text (the grounded evaluation does).

Process layout: rank 0 runs uvicorn in a thread and the batch scheduler (scheduler.py) on its main thread;
under TP/PP the other ranks follow rank 0's broadcasts. With --tp/--pp > 1 and no torchrun/Slurm environment,
the ranks are spawned locally.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo import console
from megatron_sayo.eval.serve_config import SERVE_DEFAULTS

log = logging.getLogger("megatron_sayo.serve")


# ------------------------------------------------------------------------------------------------ uvicorn

def json_error_app(status: int, body: bytes):
    """An ASGI app answering every request with `status` and the JSON `body`, then closing the connection."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    return app


def guarded_protocol(header_timeout_s: float, max_connections: int | None = None):
    """uvicorn's h11 protocol that also closes a connection whose request headers have not arrived within
    `header_timeout_s` of connecting or of the previous response (idle and half-sent connections), and answers
    in OpenAI's error JSON where uvicorn answers in plain text: the connection cap's 503 (the same count as
    uvicorn's `limit_concurrency`) and its 400 for requests that are not HTTP."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from megatron_sayo.eval.api_server import bad_http_body, overloaded_body

    overloaded = json_error_app(503, overloaded_body())

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.limit_concurrency, app = None, self.app    # the cap is checked below, answered in JSON

            async def capped(scope, receive, send):
                # uvicorn counts this connection, and the tasks before this request's own (added before it runs)
                full = max_connections is not None and (len(self.connections) >= max_connections
                                                        or len(self.tasks) - 1 >= max_connections)
                return await (overloaded if full else app)(scope, receive, send)
            self.app = capped

        def send_400_response(self, msg: str) -> None:
            body = bad_http_body(msg)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire, self.cycle)

        def _expire(self, cycle_when_armed):
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


@dataclass
class HttpServer:
    """A uvicorn server running in a daemon thread on a socket we bound (so port 0 works)."""

    server: object
    thread: threading.Thread
    port: int

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_http(state, host: str, port: int, *, backlog: int = SERVE_DEFAULTS.backlog,
               max_connections: int = SERVE_DEFAULTS.max_connections,
               read_timeout_s: float = SERVE_DEFAULTS.read_timeout_s, keep_alive_s: float = SERVE_DEFAULTS.keep_alive_s,
               on_bound=None) -> HttpServer:
    """Bind host:port and serve the API over `state` in a daemon thread; returns once it accepts connections.

    on_bound(port) runs after binding and before serving: what it prints precedes any answer (e.g. /health)."""
    import uvicorn

    from megatron_sayo.eval.api_server import make_app

    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                backlog=backlog)
    if on_bound is not None:
        on_bound(sock.getsockname()[1])
    config = uvicorn.Config(make_app(state), backlog=backlog, limit_concurrency=max_connections,
                            timeout_keep_alive=keep_alive_s, http=guarded_protocol(read_timeout_s, max_connections),
                            lifespan="off",
                            log_level="warning", access_log=False, h11_max_incomplete_event_size=64 << 10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(0.01)
    if not server.started:
        raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
    return HttpServer(server, thread, sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------ main

def build_engine(args):
    """Model + processor of this rank (parallel_state initialised)."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.eval.engine import Engine, processor_dir

    model = load_model_stage(args.hf, args.megatron, tp=args.tp, pp=args.pp)
    return Engine(model, Processor.from_pretrained(processor_dir(args.hf, args.megatron)))


def limits_for(args, engine):
    """The request limits from the flags and the model (max length, the processor's max_pixels)."""
    from megatron_sayo.eval.media import MediaPolicy
    from megatron_sayo.eval.openai_api import Limits

    max_pixels = args.max_image_pixels or \
        SERVE_DEFAULTS.max_image_pixels_factor * engine.processor.image_config.max_pixels
    media = MediaPolicy(args.allowed_local_media_path, max_pixels)
    return Limits(max_len=min(engine.max_len, args.max_model_len or engine.max_len), max_tokens=args.max_tokens_limit,
                  max_images=args.max_images_per_request, max_prompt_chars=args.max_prompt_chars, media=media)


def run_rank(args, stopped=None) -> None:
    """One rank: rank 0 serves HTTP and schedules; the others follow its broadcasts. `stopped`: the stop event
    of the parent that started the ranks locally (it alone handles the stop signals); without one (torchrun,
    Slurm) rank 0 handles SIGTERM/SIGINT itself."""
    import torch.distributed as dist

    from megatron_sayo.distributed import runtime
    from megatron_sayo.eval.api_server import ServerState
    from megatron_sayo.eval.scheduler import Scheduler, follower_loop, make_broadcast

    if stopped is None:
        stopped = threading.Event()
        handle_stop_signals(stopped, leader=runtime.read_launch_env().rank == 0)
    runtime.init_distributed(args.tp, args.pp)
    engine = build_engine(args)
    broadcast = make_broadcast()
    if dist.get_rank() != 0:
        return follower_loop(engine, broadcast)
    scheduler = Scheduler(engine, args.max_batch, broadcast, stopped)
    name = args.model_name or os.path.basename(os.path.normpath(args.hf or args.megatron))
    state = ServerState(scheduler, engine.processor, limits_for(args, engine), name, args.api_key,
                        args.max_body_bytes, args.read_timeout_s)
    media = args.allowed_local_media_path or "off"

    def banner(port: int) -> None:  # before serving: a client that saw /health answer also sees this line
        print(f"serving {name} on http://{args.host}:{port}/v1 (tp={args.tp}, pp={args.pp}, local media: "
              f"{media})", flush=True)

    http = start_http(state, args.host, args.port, backlog=args.backlog, max_connections=args.max_connections,
                      read_timeout_s=args.read_timeout_s, keep_alive_s=args.keep_alive_s, on_bound=banner)
    try:
        scheduler.serve_forever()
    finally:
        http.stop()
    if scheduler.failure is not None:
        raise SystemExit(f"server stopped: {scheduler.failure}")
    print("server stopped", flush=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def handle_stop_signals(stopped, leader: bool) -> None:
    """The leader sets `stopped` on SIGTERM/SIGINT (once: later signals change nothing); the others ignore both
    and stop when rank 0 tells them to. Then both signals are unblocked: one that came while they were blocked is
    handled now."""

    def stop(signum, _frame) -> None:
        if not stopped.is_set():
            print(f"{signal.Signals(signum).name}: stopping the server (requests in flight finish first)", flush=True)
        stopped.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop if leader else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def serve_locally(args, world: int) -> None:
    """Start the ranks as local processes and wait for them. This parent alone acts on SIGTERM and SIGINT, sent
    to it or to the whole process group (Ctrl-C, Slurm), at any moment: it sets a stop event that rank 0 serves
    under, so the ranks exit cleanly (no rank traceback, no leaked semaphores). They inherit both signals
    ignored, which covers their start, before any code of theirs runs; a signal that comes while they are being
    started waits, blocked (Linux keeps a blocked signal pending even while it is ignored), for the handler."""
    import multiprocessing

    from megatron_sayo.distributed.runtime import spawn_local

    stopped = multiprocessing.get_context("spawn").Event()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    spawn_local(run_rank, world, args, stopped, timeout_s=float("inf"),
                on_started=lambda: handle_stop_signals(stopped, leader=True))


def positive(kind):
    def check(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return check


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="OpenAI-compatible server over a Qwen2.5-VL checkpoint.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF checkpoint dir")
    src.add_argument("--megatron", help="megatron checkpoint dir (converted, step dir or run dir)")
    p.add_argument("--tp", type=positive(int), default=1,
                   help="tensor-parallel size (local ranks started by the server)")
    p.add_argument("--pp", type=positive(int), default=1, help="pipeline-parallel size")
    p.add_argument("--host", default=SERVE_DEFAULTS.host, help="bind address (default: loopback)")
    p.add_argument("--log-level", choices=console.LEVELS, default="warning",
                   help="other libraries' log level (default: their known noise hidden)")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    p.add_argument("--api-key", default=os.environ.get("SAYO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SAYO_API_KEY; none: no key)")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: dir name)")
    p.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                   help="let requests name local image files, only inside DIR (after resolving links); "
                        "default: local media off")
    lim = p.add_argument_group("limits (README: Security and limits)")
    lim.add_argument("--max-batch", type=positive(int), default=SERVE_DEFAULTS.max_batch,
                     help="most requests per batch")
    lim.add_argument("--max-tokens-limit", type=positive(int), default=SERVE_DEFAULTS.max_tokens_limit,
                     help="largest max_tokens a request may ask for")
    lim.add_argument("--max-model-len", type=positive(int), default=None,
                     help="prompt + completion tokens (default: the model's max_position_embeddings)")
    lim.add_argument("--max-image-pixels", type=positive(int), default=None,
                     help=f"largest width x height in an image header, checked before decoding (default: "
                          f"{SERVE_DEFAULTS.max_image_pixels_factor} x the processor's max_pixels)")
    lim.add_argument("--max-images-per-request", type=positive(int), default=SERVE_DEFAULTS.max_images_per_request,
                     help="images a request may carry, counted before any is decoded")
    lim.add_argument("--max-prompt-chars", type=positive(int), default=SERVE_DEFAULTS.max_prompt_chars,
                     help="characters of message text, checked before tokenizing")
    lim.add_argument("--max-body-bytes", type=positive(int), default=SERVE_DEFAULTS.max_body_bytes,
                     help="largest request body; larger ones get 413 before being read")
    lim.add_argument("--max-connections", type=positive(int), default=SERVE_DEFAULTS.max_connections,
                     help="open connections; requests beyond get 503")
    lim.add_argument("--backlog", type=positive(int), default=SERVE_DEFAULTS.backlog, help="listen backlog")
    lim.add_argument("--read-timeout-s", type=positive(float), default=SERVE_DEFAULTS.read_timeout_s,
                     help="request headers, then the body, must arrive within this")
    lim.add_argument("--keep-alive-s", type=positive(float), default=SERVE_DEFAULTS.keep_alive_s,
                     help="idle keep-alive connections are closed after this")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        p.error(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    console.setup(args.log_level)
    world = args.tp * args.pp
    if world > 1 and "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ:
        serve_locally(args, world)
    else:
        if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ and "MASTER_PORT" not in os.environ:
            from megatron_sayo.distributed.runtime import free_port

            os.environ["MASTER_PORT"] = str(free_port())   # never collide with another job's default port
        run_rank(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
