"""The server at TP=2 (two local ranks in lockstep, rank 0 broadcasting each batch): the same greedy text,
stop handling, streaming and log-probs as the in-process TP=1 server; one request never hurts another (issue 29).
The tests share one TP=2 server process (started once: its start-up is most of their time)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import openai
import pytest

TEXT = [{"role": "user", "content": "Tell me about the picture."}]
FAULTY_SITE = Path(__file__).parent / "faulty_site"


@pytest.fixture(scope="module")
def tp2(tiny_ckpt, tmp_path_factory):
    """A TP=2 server subprocess (rank 0 serving HTTP, rank 1 its follower) on the tiny checkpoint, with
    faulty_site/sitecustomize.py loaded in each of its processes (one TAS completion fails on purpose)."""
    from megatron_sayo.eval.server_process import start_server

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAULTY_SITE), os.environ.get("PYTHONPATH")])))
        server = start_server(str(tiny_ckpt), None, 2, tmp_path_factory.mktemp("tp2") / "server.log",
                              startup_s=600, extra_args=["--model-name", "tiny", "--max-tokens-limit", "4000"])
    yield server
    server.stop()


def health(tp2) -> dict:
    from megatron_sayo.eval.server_process import http_json

    status, body = http_json(tp2.health_url, timeout=30)
    assert status == 200, body
    return body


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_server_matches_tp1(server, tp2):
    ref = server.client.chat.completions.create(model="tiny", messages=TEXT, max_tokens=10, temperature=0,
                                                logprobs=True, top_logprobs=2)
    text = ref.choices[0].message.content
    assert "tp=2" in tp2.log_path.read_text()
    client = openai.OpenAI(base_url=tp2.url, api_key=tp2.api_key, max_retries=0, timeout=300)
    got = client.chat.completions.create(model="tiny", messages=TEXT, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == text
    assert got.usage.model_dump() == ref.usage.model_dump()
    for a, b in zip(got.choices[0].logprobs.content, ref.choices[0].logprobs.content, strict=True):
        assert a.token == b.token and math.isclose(a.logprob, b.logprob, rel_tol=1e-4, abs_tol=1e-5)
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=TEXT, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == text
    if len(text) >= 4:
        stop = text[2:4]
        cut = client.chat.completions.create(model="tiny", messages=TEXT, max_tokens=10, temperature=0,
                                             stop=[stop])
        assert cut.choices[0].message.content == text[:text.find(stop)]
        assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens <= 10


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_server_survives_hot_sampling_and_cancels_a_departed_client(server, tp2):
    """Issue 29 at TP=2: the reproducer (temperature 2, n 16, seed 2) beside a greedy client samples no vision id
    and leaves the greedy answer as it is alone (the follower used to die on the sampled <|image_pad|>); a
    streaming client that leaves after 2 chunks is cancelled on both ranks, so a 5-token request behind it is
    answered at once; /health still says ok and the server still answers."""
    import socket
    import time

    from test_request_isolation import GREEDY, HOT, assert_no_vision_tokens, chat_request, hot_and_greedy

    alone = server.client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=12)
    before = health(tp2)
    client = openai.OpenAI(base_url=tp2.url, api_key=tp2.api_key, max_retries=0, timeout=300)
    hot, greedy = hot_and_greedy(client)
    assert_no_vision_tokens(hot)
    assert not isinstance(greedy, Exception), greedy
    assert greedy.choices[0].message.content == alone.choices[0].message.content
    port = int(tp2.url.rsplit(":", 1)[1].split("/")[0])
    s = socket.create_connection(("127.0.0.1", port))
    body = chat_request({"model": "tiny", "messages": HOT, "temperature": 0, "max_tokens": 4000, "stream": True})
    s.sendall(body.replace(b"Host: x\r\n", f"Host: x\r\nAuthorization: Bearer {tp2.api_key}\r\n".encode()))
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    s.close()
    t0 = time.monotonic()
    quick = client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=5)
    assert time.monotonic() - t0 < 3.0 and quick.usage.completion_tokens <= 5
    after = health(tp2)                                   # counted from this test's start (the server is shared)
    assert after["status"] == "ok" and after["cancelled_requests"] - before["cancelled_requests"] == 1
    assert after["failed_requests"] - before["failed_requests"] == 0


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_request_that_fails_alone_spares_its_neighbour_and_the_follower(server, tp2, make_image):
    """Issue 29 at TP=2: a request whose own model pass fails on both ranks (a /v1/tas completion that
    faulty_site/sitecustomize.py fails on purpose: validation now refuses the requests that used to fail there)
    and a greedy chat request queued behind a busy one, so that both reach the engine in the same batch: the bad
    one gets a 500 generation_failed naming the fault, the greedy one its text as alone; the follower rank goes
    on, so later chat and TAS requests are answered (the same greedy text) and /health says ok, with one failed
    request more."""
    import base64
    import io
    import threading
    import time

    from test_request_isolation import GREEDY, HOT

    from megatron_sayo.eval.server_process import http_json

    alone = server.client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=12)
    buf = io.BytesIO()
    make_image(56, 56, seed=5).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    tas = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": "What is in the corner?"}]}],
           "boxes": [[0, 0, 28, 28]]}
    bad_tas = {**tas, "completion": "fail on purpose"}
    client = openai.OpenAI(base_url=tp2.url, api_key=tp2.api_key, max_retries=0, timeout=300)
    before = health(tp2)

    out, sent, done = {}, {}, {}

    def send(name, call):
        sent[name] = time.monotonic()
        try:
            out[name] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out[name] = exc
        done[name] = time.monotonic()

    calls = {"busy": lambda: client.chat.completions.create(model="tiny", messages=HOT, temperature=0,
                                                            max_tokens=256),
             "bad": lambda: http_json(tp2.url + "/tas", bad_tas, api_key=tp2.api_key, timeout=300),
             "greedy": lambda: client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0,
                                                              max_tokens=12)}
    threads = {name: threading.Thread(target=send, args=(name, call)) for name, call in calls.items()}
    threads["busy"].start()
    time.sleep(0.3)                          # the busy request is generating: the next two wait for one batch
    threads["bad"].start()
    threads["greedy"].start()
    for t in threads.values():
        t.join(120)
    # both were sent while the busy batch ran and answered after it: they formed the next batch together
    assert max(sent["bad"], sent["greedy"]) < done["busy"] < min(done["bad"], done["greedy"])
    assert not isinstance(out["busy"], Exception) and not isinstance(out["greedy"], Exception), out
    status, error = out["bad"]
    assert status == 500 and error["error"]["code"] == "generation_failed", error
    assert error["error"]["message"].startswith("generation failed for this request: ")
    assert "injected by the test" in error["error"]["message"]
    assert out["greedy"].choices[0].message.content == alone.choices[0].message.content

    later = client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=12)
    assert later.choices[0].message.content == alone.choices[0].message.content
    status, good = http_json(tp2.url + "/tas", {**tas, "completion": "A square."}, api_key=tp2.api_key, timeout=120)
    assert status == 200 and math.isfinite(good["tas"]), good
    after = health(tp2)
    assert after["status"] == "ok" and after["failed_requests"] - before["failed_requests"] == 1
    assert tp2.proc.poll() is None
