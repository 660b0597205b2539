"""One request never hurts another (issue 29): sampling never emits a vision placeholder (the reproducer: hot
sampling, n=16, beside a greedy client whose answer must stay what it is alone), a job whose own generation
fails gets an error while its batch neighbours complete, a client that disconnects has its generation
stopped within a few decode steps, and lone surrogates are a 400 naming the field. Clients: the openai
library, or raw sockets where a client must vanish mid-response."""

from __future__ import annotations

import json
import socket
import threading
import time

import openai
import pytest

from megatron_sayo.eval.errors import ApiError

VISION = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
GREEDY = [{"role": "user", "content": "Tell me about the picture."}]
HOT = [{"role": "user", "content": "Say anything at all."}]


def hot_and_greedy(client, greedy_max: int = 12):
    """The reproducer (temperature 2, n 16, seed 2, with log-probs to see each token) sent at the same moment
    as a greedy request; returns (hot response or exception, greedy response or exception)."""
    out = {}

    def send(name, **kw):
        try:
            out[name] = client.chat.completions.create(model="tiny", **kw)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[name] = exc

    threads = [threading.Thread(target=send, args=("hot",), kwargs=dict(messages=HOT, temperature=2.0, n=16, seed=2,
                                                                        max_tokens=48, logprobs=True)),
               threading.Thread(target=send, args=("greedy",), kwargs=dict(messages=GREEDY, temperature=0,
                                                                           max_tokens=greedy_max))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out["hot"], out["greedy"]


def assert_no_vision_tokens(hot) -> None:
    assert not isinstance(hot, Exception), hot
    tokens = [t.token for c in hot.choices for t in c.logprobs.content]
    assert len(tokens) > 16 * 8
    assert not set(tokens) & set(VISION), sorted(set(tokens) & set(VISION))


def test_hot_sampling_never_emits_vision_tokens_and_spares_its_neighbour(server):
    alone = server.client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=12)
    for _ in range(2):
        hot, greedy = hot_and_greedy(server.client)
        assert_no_vision_tokens(hot)
        assert not isinstance(greedy, Exception), greedy
        assert greedy.choices[0].message.content == alone.choices[0].message.content


class Ticket:
    """A scheduler ticket recording what it got."""

    def __init__(self):
        self.text, self.result, self.error, self.done = [], None, None, threading.Event()
        self.cancelled = False

    def stream(self, choice, text):
        self.text.append(text)

    def deliver(self, result):
        self.result = result
        self.done.set()

    def fail(self, exc):
        self.error = exc
        self.done.set()


@pytest.mark.multiproc
def test_a_job_that_fails_alone_fails_alone(server):
    """A job whose prompt holds an image placeholder but no pixels (the model refuses it, as it refused a sampled
    one) batched with a streaming greedy job of the same sampling key: the bad one gets a clear 500-class error,
    the good one its usual text, streamed once; the server goes on serving."""
    proc = server.engine.processor
    good_ids = proc.encode_prompt(proc.apply_chat_template(GREEDY, add_generation_prompt=True), [])[0]
    params = (0.0, 1.0, True, 10, 1, 0)
    good = {"kind": "chat", "ids": good_ids, "pixel_values": None, "image_grid_thw": None, "params": params,
            "stop": [], "logprobs": None, "stream": True, "include_usage": False}
    bad = {**good, "ids": good_ids[:3] + [server.engine.hf.tokens.image] + good_ids[3:], "stream": False}
    alone = server.client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=10)
    # submitted together while the engine is busy with a long request, so they form one batch
    busy = threading.Thread(target=server.client.chat.completions.create,
                            kwargs=dict(model="tiny", messages=HOT, temperature=0, max_tokens=64))
    busy.start()
    time.sleep(0.3)
    tickets = [Ticket(), Ticket()]
    for job, ticket in zip((bad, good), tickets):
        server.scheduler.submit(job, ticket)
    busy.join(120)
    assert all(t.done.wait(120) for t in tickets)
    bad_t, good_t = tickets
    assert isinstance(bad_t.error, ApiError) and bad_t.error.status == 500
    assert bad_t.error.code == "generation_failed" and "pixel_values" in bad_t.error.message
    assert good_t.error is None, good_t.error
    assert good_t.result["choices"][0]["text"] == alone.choices[0].message.content
    assert alone.choices[0].message.content.startswith("".join(good_t.text))    # streamed once, not twice
    again = server.client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=10)
    assert again.choices[0].message.content == alone.choices[0].message.content


def test_follower_survives_a_failed_batch_and_stops_on_broken_ranks():
    """follower_loop (ranks other than 0): an engine error is the same on every rank, so it goes on; a
    communication failure ends the rank with the reason."""
    from megatron_sayo.eval.scheduler import follower_loop

    class Engine:
        def __init__(self):
            self.ran = []

        def run_batch(self, jobs):
            self.ran.append(jobs)
            if jobs == ["bad"]:
                raise ValueError("input_ids hold 1 <|image_pad|> tokens but no pixel_values were given")
            if jobs == ["gone"]:
                raise RuntimeError("[gloo] Connection closed by peer")
            return jobs

    engine, feed = Engine(), iter([["bad"], [], ["ok"], None])
    follower_loop(engine, lambda _: next(feed))
    assert engine.ran == [["bad"], ["ok"]]
    feed = iter([["gone"], ["never"]])
    with pytest.raises(RuntimeError, match="can no longer work together"):
        follower_loop(engine, lambda _: next(feed))


def test_broken_ranks_stop_the_server_and_health_says_why(server):
    """On a communication failure the scheduler fails the batch and the queue with 503 naming the reason, stops,
    and /health answers 503 with it (a server of its own over the shared engine)."""
    from megatron_sayo.eval.api_server import ServerState
    from megatron_sayo.eval.scheduler import Scheduler
    from megatron_sayo.eval.serve import start_http

    class Broken:
        stats = server.engine.stats

        def run_batch(self, jobs, sink=None, cancelled=None):
            raise RuntimeError("[gloo] Connection closed by peer")

    scheduler = Scheduler(Broken())
    state = ServerState(scheduler, server.engine.processor, server.http.server.config.app.state.server.limits, "tiny")
    http = start_http(state, "127.0.0.1", 0)
    worker = threading.Thread(target=scheduler.serve_forever, daemon=True)
    worker.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="tiny", messages=GREEDY, max_tokens=3)
        assert err.value.status_code == 503 and "Connection closed by peer" in err.value.body["message"]
        worker.join(10)
        assert not worker.is_alive()
        s = socket.create_connection(("127.0.0.1", http.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, body = read_http(s)
        assert status == 503 and body["status"] == "failed" and "Connection closed" in body["error"]["message"]
    finally:
        http.stop()


# ------------------------------------------------------------------------------------------------ cancellation

def read_http(s: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of a response with Connection: close."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def chat_request(body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)


@pytest.fixture(scope="module")
def long_server(server):
    """A server of its own over the shared scheduler whose limits allow 4,000-token completions."""
    import dataclasses

    from megatron_sayo.eval.api_server import ServerState
    from megatron_sayo.eval.serve import start_http

    limits = dataclasses.replace(server.http.server.config.app.state.server.limits, max_tokens=4000)
    http = start_http(ServerState(server.scheduler, server.engine.processor, limits, "tiny"), "127.0.0.1", 0)
    yield http
    http.stop()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnected_client_is_cancelled(server, long_server, stream):
    """A client asking for 4,000 greedy tokens (about 6 s on the tiny model) leaves (after 2 chunks, or while
    waiting); its generation stops within a few decode steps and a 5-token request sent right after is answered
    in about the time it takes alone."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{long_server.port}/v1", api_key="x", max_retries=0,
                           timeout=120)
    t0 = time.monotonic()
    client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=5)
    alone_s = time.monotonic() - t0
    stats = server.engine.stats
    before_tokens, before_cancelled = stats.generated_tokens, stats.cancelled_requests
    s = socket.create_connection(("127.0.0.1", long_server.port))
    s.sendall(chat_request({"model": "tiny", "messages": HOT, "temperature": 0, "max_tokens": 4000,
                            "stream": stream}))
    if stream:
        got = b""
        while got.count(b"data: ") < 3:         # the role chunk and two text chunks
            got += s.recv(4096)
    else:
        time.sleep(0.3)                         # generation under way
    s.close()
    t0 = time.monotonic()
    quick = client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=5)
    waited = time.monotonic() - t0
    assert quick.usage.completion_tokens <= 5
    assert waited < alone_s + 1.5, (waited, alone_s)
    deadline = time.monotonic() + 10
    while stats.cancelled_requests == before_cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.cancelled_requests == before_cancelled + 1
    spent = stats.generated_tokens - before_tokens - quick.usage.completion_tokens
    assert spent < 1000, spent                  # stopped long before its 4,000 tokens


# ------------------------------------------------------------------------------------------------ text validation

@pytest.mark.parametrize("body,param", [
    ('{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ('{"messages": [{"role": "user", "content": "a\\udc00b"}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\ud83d"]}', "stop[1]"),
    ('{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800\\ud800"}', "user"),
], ids=["model", "content", "text-part", "stop", "user"])
def test_lone_surrogate_is_a_400_naming_the_field(server, body, param):
    s = socket.create_connection(("127.0.0.1", server.http.port))
    raw = body.encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    status, out = read_http(s)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["code"] == "invalid_unicode"
    assert param in out["error"]["message"] and "surrogate" in out["error"]["message"]
