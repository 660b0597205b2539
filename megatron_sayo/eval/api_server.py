"""The server's HTTP API as a Starlette (ASGI) application, run by uvicorn (serve.py).

Routes: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /v1/models/{id},
GET /health (no key needed; batching stats), POST /v1/tas (ours: teacher-force a completion after a grounded
prompt and return its TAS, see engine.py).

Order of work for a request, cheapest first: route; API key from the headers (constant-time compare) before
any byte of the body is read; Content-Length against the body limit; the body, read within the read timeout
and stopped at the limit; JSON (a nesting too deep for the parser is a 400); every string valid Unicode (a lone
surrogate is a 400 naming the field); the model name; then parameter and message checks, image decoding and
tokenizing in a worker thread (openai_api.py) so the event loop keeps serving; then the job goes to the
scheduler and the handler awaits its ticket, while a watcher marks the ticket cancelled if the client
disconnects (its rows then end at the next decode step).

Every error is OpenAI-shaped JSON, including uvicorn's own 400 and 503 (serve.py) and unhandled 500s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from megatron_sayo.eval import openai_responses
from megatron_sayo.eval.errors import ApiError
from megatron_sayo.eval.openai_api import Limits, parse_chat_request, parse_tas_request

log = logging.getLogger("megatron_sayo.serve")


@dataclass
class ServerState:
    """What the handlers need: scheduler, processor, limits, model name, API key, body limit and timeout."""

    scheduler: object
    processor: object
    limits: Limits
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 64 << 20
    read_timeout_s: float = 30.0
    started: int = field(default_factory=lambda: int(time.time()))


class AsyncTicket:
    """A job's mailbox on the event loop: the scheduler thread posts ('delta', choice, text), ('done', result)
    or ('error', exc) into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events = loop, asyncio.Queue()
        self.cancelled = False      # the client left: the scheduler drops the job, the engine ends its rows

    def cancel(self) -> None:
        self.cancelled = True

    def _post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def stream(self, choice: int, text: str) -> None:
        self._post("delta", choice, text)

    def deliver(self, result: dict) -> None:
        self._post("done", result)

    def fail(self, exc: Exception) -> None:
        self._post("error", exc)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def internal_error(exc: Exception) -> ApiError:
    """The ApiError itself, or a 500 naming an unexpected exception."""
    if isinstance(exc, ApiError):
        return exc
    return ApiError(f"internal error: {type(exc).__name__}: {exc}", None, "internal_error", 500, "server_error")


def check_unicode(value, param: str = "") -> None:
    """400 naming the field when a string (or object key) holds a lone surrogate, which is not Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(f"'{param or 'body'}' is not valid Unicode text: {exc.reason} at character {exc.start}",
                           param or None, "invalid_unicode") from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_unicode(item, f"{param}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, param or "body")
            check_unicode(item, f"{param}.{key}" if param else key)


def check_key(request: Request, state: ServerState) -> None:
    """401 unless 'Authorization: Bearer KEY' matches (constant time); nothing of the body has been read."""
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {state.api_key}".encode()):
        raise ApiError("invalid or missing API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key",
                       401, "authentication_error")


async def read_body(request: Request, state: ServerState) -> bytes:
    """The body, refused (413) past max_body_bytes before or while reading, and 408 past the read timeout."""
    limit = state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError("bad Content-Length header")
        if int(declared) > limit:
            raise ApiError(f"request body of {declared} bytes exceeds {limit} (--max-body-bytes)", None,
                           "request_too_large", 413)
    chunks, size = [], 0

    async def collect():
        nonlocal size
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(f"request body exceeds {limit} bytes (--max-body-bytes)", None, "request_too_large",
                               413)
            chunks.append(part)

    try:
        await asyncio.wait_for(collect(), state.read_timeout_s)
    except TimeoutError:
        raise ApiError(f"request body not received within {state.read_timeout_s:g} s (--read-timeout-s)", None,
                       "request_timeout", 408) from None
    if not size:
        raise ApiError("empty request body: send a JSON object")
    return b"".join(chunks)


def parse_json(raw: bytes):
    """JSON of a request body; malformed, non-UTF-8 or too deeply nested bodies are a 400."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise ApiError("request body is nested too deeply", None, "invalid_json") from None


def check_model(body, state: ServerState) -> None:
    """404 model_not_found when the request names a model this server does not serve (as vLLM answers)."""
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != state.model_name:
        raise ApiError(f"The model `{model}` does not exist.", "model", "model_not_found", 404, "NotFoundError")


async def json_request(request: Request, state: ServerState):
    check_key(request, state)
    body = await run_in_threadpool(parse_json, await read_body(request, state))
    await run_in_threadpool(check_unicode, body)
    check_model(body, state)
    return body


def api_route(handler):
    """Wrap a handler: ApiError -> OpenAI error JSON; anything else -> 500 JSON, and the server keeps serving."""
    async def endpoint(request: Request):
        try:
            return await handler(request, request.app.state.server)
        except ApiError as err:
            return error_response(err)
        except Exception as exc:
            log.exception("request failed")
            return error_response(internal_error(exc))
    return endpoint


async def watch_disconnect(request: Request, ticket: AsyncTicket) -> None:
    """Cancel the ticket when the client disconnects (the body has been read: the next message is the
    disconnect, sent when the connection closes or after the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    ticket.cancel()


def watched(request: Request, ticket: AsyncTicket) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(watch_disconnect(request, ticket))


async def wait_result(ticket: AsyncTicket) -> dict:
    """The job's result (streamed deltas ignored); re-raises the engine's failure."""
    while True:
        event = await ticket.events.get()
        if event[0] == "done":
            return event[1]
        if event[0] == "error":
            raise event[1]


def submit(state: ServerState, job: dict) -> AsyncTicket:
    ticket = AsyncTicket(asyncio.get_running_loop())
    state.scheduler.submit(job, ticket)
    return ticket


async def chat_completions(request: Request, state: ServerState):
    body = await json_request(request, state)
    job = await run_in_threadpool(parse_chat_request, body, state.processor, state.limits)
    ticket = submit(state, job)
    watcher = watched(request, ticket)
    if not job["stream"]:
        try:
            return JSONResponse(openai_responses.chat_completion(await wait_result(ticket), state.model_name))
        finally:
            watcher.cancel()
    return StreamingResponse(stream_events(ticket, job, state.model_name, watcher), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def stream_events(ticket: AsyncTicket, job: dict, model: str, watcher: asyncio.Task | None = None):
    """The SSE body of a streaming request (see openai_responses.py for the order of chunks); a client that
    leaves before the end (its body's generator closed or cancelled) cancels the ticket."""
    rid, created, n = openai_responses.new_id(), int(time.time()), job["params"][4]
    sent: dict[int, str] = {}
    finished = False

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return openai_responses.sse(openai_responses.chunk(rid, created, model, choices, usage))

    try:
        yield chunk([openai_responses.delta_choice(c, {"role": "assistant", "content": ""}) for c in range(n)])
        while True:
            event = await ticket.events.get()
            if event[0] == "delta":
                _, choice, text = event
                sent[choice] = sent.get(choice, "") + text
                yield chunk([openai_responses.delta_choice(choice, {"content": text})])
            elif event[0] == "error":
                finished = True
                yield openai_responses.sse(internal_error(event[1]).body())
                break
            else:
                finished = True
                result = event[1]
                yield chunk(openai_responses.final_choices(result, sent))
                if job["include_usage"]:
                    yield chunk([], openai_responses.usage(result))
                break
        yield openai_responses.sse("[DONE]")
    finally:
        if not finished:
            ticket.cancel()
        if watcher is not None:
            watcher.cancel()


async def tas(request: Request, state: ServerState):
    body = await json_request(request, state)
    engine = state.scheduler.engine
    hf = engine.hf
    job = await run_in_threadpool(parse_tas_request, body, state.processor, state.limits, hf.tokens,
                                  hf.vision.spatial_merge_size, hf.vision.patch_size)
    generated = engine.generated_ids(job["ids"], body["completion"])
    if generated is not None:
        job.update(completion_ids=generated, source="generated")
    return JSONResponse(await wait_result(submit(state, job)))


def model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "megatron_sayo"}


async def models(request: Request, state: ServerState):
    check_key(request, state)
    return JSONResponse({"object": "list", "data": [model_card(state)]})


async def model(request: Request, state: ServerState):
    check_key(request, state)
    check_model({"model": request.path_params["model_id"]}, state)
    return JSONResponse(model_card(state))


async def health(request: Request, state: ServerState):
    """200 with batching stats while serving; 503 with the reason (OpenAI error JSON) once the server failed."""
    failure = getattr(state.scheduler, "failure", None)
    if failure is not None:
        return JSONResponse({"status": "failed", **state.scheduler.unavailable().body()}, status_code=503)
    stats = vars(state.scheduler.engine.stats)
    return JSONResponse({"status": "ok", "model": state.model_name, "queued": state.scheduler.queue.qsize(), **stats})


async def not_found(request: Request, exc: HTTPException):
    """Unknown routes and methods answer in OpenAI's error format too."""
    code = "not_found" if exc.status_code == 404 else "method_not_allowed"
    return error_response(ApiError(f"no route {request.method} {request.url.path}", None, code, exc.status_code))


async def server_error(request: Request, exc: Exception):
    """An exception no handler caught (Starlette's last resort) as OpenAI error JSON, not plain text."""
    return error_response(internal_error(exc))


def overloaded_body() -> bytes:
    """The 503 body when the connection cap is reached (serve.py sends it in uvicorn's place)."""
    return json.dumps(ApiError("the server is at its connection limit (--max-connections); retry later", None,
                               "server_overloaded", 503, "server_error").body()).encode()


def bad_http_body(reason: str) -> bytes:
    """The 400 body for a request uvicorn could not parse as HTTP (serve.py sends it in uvicorn's place)."""
    return json.dumps(ApiError(f"invalid HTTP request: {reason}", None, "invalid_http_request").body()).encode()


def make_app(state: ServerState) -> Starlette:
    """The ASGI application over a server state."""
    routes = [Route("/v1/chat/completions", api_route(chat_completions), methods=["POST"]),
              Route("/v1/tas", api_route(tas), methods=["POST"]),
              Route("/v1/models", api_route(models), methods=["GET"]),
              Route("/v1/models/{model_id:path}", api_route(model), methods=["GET"]),
              Route("/health", api_route(health), methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: server_error})
    app.state.server = state
    return app
