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
