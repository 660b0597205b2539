"""The server at TP=2 (two local ranks in lockstep, rank 0 broadcasting each batch): the same greedy text,
stop handling, streaming and log-probs as the in-process TP=1 server."""

from __future__ import annotations

import math

import openai
import pytest

TEXT = [{"role": "user", "content": "Tell me about the picture."}]


@pytest.mark.slow
def test_tp2_server_matches_tp1(server, tiny_ckpt, tmp_path):
    from megatron_sayo.eval.server_process import start_server

    ref = server.client.chat.completions.create(model="tiny", messages=TEXT, max_tokens=10, temperature=0,
                                                logprobs=True, top_logprobs=2)
    text = ref.choices[0].message.content
    tp2 = start_server(str(tiny_ckpt), None, 2, tmp_path / "server.log", startup_s=600,
                       extra_args=["--model-name", "tiny"])
    try:
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
    finally:
        tp2.stop()


@pytest.mark.slow
def test_tp2_server_survives_hot_sampling_and_cancels_a_departed_client(server, tiny_ckpt, tmp_path):
    """Issue 29 at TP=2: the reproducer (temperature 2, n 16, seed 2) beside a greedy client samples no vision id
    and leaves the greedy answer as it is alone (the follower used to die on the sampled <|image_pad|>); a
    streaming client that leaves after 2 chunks is cancelled on both ranks, so a 5-token request behind it is
    answered at once; /health still says ok and the server still answers."""
    import socket
    import time

    from test_request_isolation import GREEDY, HOT, assert_no_vision_tokens, chat_request, hot_and_greedy

    from megatron_sayo.eval.server_process import http_json, start_server

    alone = server.client.chat.completions.create(model="tiny", messages=GREEDY, temperature=0, max_tokens=12)
    tp2 = start_server(str(tiny_ckpt), None, 2, tmp_path / "server.log", startup_s=600,
                       extra_args=["--model-name", "tiny", "--max-tokens-limit", "4000"])
    try:
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
        status, health = http_json(tp2.health_url, timeout=30)
        assert status == 200 and health["status"] == "ok" and health["cancelled_requests"] == 1
        assert health["failed_requests"] == 0
    finally:
        tp2.stop()
