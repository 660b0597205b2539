"""OpenAI-compatible server, driven by the official `openai` client where a client would be used: good
requests, streaming (SSE deltas, finish_reason, [DONE], include_usage), log-probs against transformers, stop
strings, every bad request (4xx + OpenAI error JSON, still serving after), API key, continuous batching with
the same greedy answers as one by one, and /v1/tas against a direct score_policy computation."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch

TEXT = [{"role": "user", "content": "Say something."}]


def request(url: str, body=None, raw: bytes | None = None, key: str | None = None, method=None):
    """(status, JSON body) of one HTTP call (for what a client library would refuse to send)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method=method or ("GET" if data is None else "POST"))
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(server, messages, **params):
    return server.client.chat.completions.create(model="tiny", messages=messages, **params)


# ------------------------------------------------------------------------------------------------ good requests

@pytest.mark.compat
def test_text_request_has_openai_shape(server):
    out = chat(server, TEXT, max_tokens=5, temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny"
    (choice,) = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert 1 <= out.usage.completion_tokens <= 5 and out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_image_as_data_url_path_file_url_and_tag_agree(server, make_image, media_dir):
    """One image sent four ways (local ones inside the allowed dir) gives the same prompt and completion."""
    image = make_image(60, 44, seed=3)
    path = media_dir / "im.png"
    image.save(path)
    outs = []
    for ref in (png_data_url(image), str(path), f"file://{path}", "im.png"):
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}},
                                            {"type": "text", "text": "What is it?"}]}]
        out = chat(server, msg, max_tokens=6, temperature=0)
        outs.append((out.choices[0].message.content, out.usage.prompt_tokens))
    out = chat(server, [{"role": "user", "content": f"<image_url>{path}</image_url>What is it?"}], max_tokens=6,
               temperature=0)
    outs.append((out.choices[0].message.content, out.usage.prompt_tokens))
    assert len(set(outs)) == 1, outs
    assert outs[0][1] > 20   # the image's pad tokens are in the prompt


def test_n_choices_and_sampling(server, make_image):
    msg = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(make_image(56, 56))}},
                                        {"type": "text", "text": "Describe."}]}]
    out = chat(server, msg, n=3, max_tokens=6, temperature=0.9, top_p=0.9, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert 3 <= out.usage.completion_tokens <= 18


def test_developer_role_is_system(server):
    """OpenAI's `developer` role gives exactly the prompt (and greedy answer) of a system message."""
    as_system = chat(server, [{"role": "system", "content": "Be brief."}, *TEXT], max_tokens=6, temperature=0)
    as_developer = chat(server, [{"role": "developer", "content": "Be brief."}, *TEXT], max_tokens=6, temperature=0)
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def test_models_list_retrieve_and_unknown(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert server.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as exc:
        server.client.models.retrieve("gpt-4o")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as exc:
        server.client.chat.completions.create(model="gpt-4o", messages=TEXT, max_tokens=2)
    assert exc.value.code == "model_not_found" and exc.value.body["param"] == "model"
    status, body = request(server.url + "/health")
    assert status == 200 and body["status"] == "ok" and "batches" in body


# ------------------------------------------------------------------------------------------------ streaming

def test_stream_matches_non_stream_at_temperature_zero(server, make_image):
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(make_image(56, 56))}},
                                        {"type": "text", "text": "Describe the picture in detail."}]}]
    plain = chat(server, msg, max_tokens=24, temperature=0)
    chunks = list(chat(server, msg, max_tokens=24, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_wire_format_ends_with_done(server):
    """The raw SSE body: 'data: {json}' events, no usage chunk unless asked, then 'data: [DONE]'."""
    import httpx

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": TEXT, "max_tokens": 4, "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["choices"] for p in payloads) and "usage" not in payloads[-1]


def test_stream_several_choices(server):
    chunks = list(chat(server, TEXT, max_tokens=6, temperature=0.8, seed=3, n=2, stream=True))
    plain = chat(server, TEXT, max_tokens=6, temperature=0.8, seed=3, n=2)
    for k in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == k)
        assert text == plain.choices[k].message.content


# ------------------------------------------------------------------------------------------------ logprobs, stop

@pytest.mark.compat
def test_logprobs_match_transformers(server, tiny_ckpt):
    """logprobs/top_logprobs (temperature 0) equal transformers' float32 eager log-softmax on the same ids."""
    from megatron_sayo.testing.parity import hf_logits

    out = chat(server, TEXT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    proc = server.engine.processor
    prompt = proc.tokenizer.encode(proc.apply_chat_template([{"role": "user", "content": "Say something."}],
                                                            add_generation_prompt=True))
    assert len(prompt) == out.usage.prompt_tokens
    generated = server.engine.generated_ids(prompt, out.choices[0].message.content)
    assert generated is not None and len(generated) == len(content)
    ids = torch.tensor([prompt + generated])
    ref = torch.from_numpy(hf_logits(str(tiny_ckpt), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    ref = ref[0, len(prompt) - 1:-1].double().log_softmax(-1)
    for t, item in enumerate(content):
        assert item.token == proc.tokenizer.decode([generated[t]])
        assert math.isclose(item.logprob, float(ref[t, generated[t]]), rel_tol=1e-4, abs_tol=1e-5)
        top = ref[t].topk(3)
        assert [proc.tokenizer.decode([i]) for i in top.indices.tolist()] == [a.token for a in item.top_logprobs]
        for alt, want in zip(item.top_logprobs, top.values.tolist()):
            assert math.isclose(alt.logprob, want, rel_tol=1e-4, abs_tol=1e-5)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-6   # greedy: the argmax


def test_stop_string_stops_generation(server):
    """A stop string ends generation where it appears: text cut before it, usage counts only generated tokens."""
    tok = server.engine.processor.tokenizer
    full = chat(server, TEXT, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    proc = server.engine.processor
    prompt = tok.encode(proc.apply_chat_template(TEXT, add_generation_prompt=True))
    ids = server.engine.generated_ids(prompt, text)
    assert ids is not None and len(text) >= 6, text
    stop = text[3:5]
    needed = next(t for t in range(1, len(ids) + 1) if stop in tok.decode(ids[:t], skip_special_tokens=True))
    out = chat(server, TEXT, max_tokens=16, temperature=0, stop=[stop, "\x00never"])
    assert out.choices[0].message.content == text[:text.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == needed < 16
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, TEXT, max_tokens=16, temperature=0,
                                                                      stop=[stop], stream=True) if c.choices)
    assert streamed == text[:text.find(stop)]


# ------------------------------------------------------------------------------------------------ bad requests

def _img(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "?"}]}]


BAD = [
    ("malformed JSON", None, b"{not json", 400, "invalid_json", None),
    ("empty body", None, b"", 400, None, None),
    ("body not an object", [1, 2], None, 400, None, None),
    ("missing messages", {"model": "tiny"}, None, 400, "missing_required_parameter", "messages"),
    ("messages not a list", {"messages": "hi"}, None, 400, None, "messages"),
    ("empty messages", {"messages": []}, None, 400, None, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, None, "messages[0].role"),
    ("missing content", {"messages": [{"role": "user"}]}, None, 400, None, None),
    ("last not user", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     None, 400, None, None),
    ("bad part type", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, None, 400, None,
     None),
    ("undecodable image", {"messages": _img("data:image/png;base64," + base64.b64encode(b"not a png").decode())},
     None, 400, "invalid_image", None),
    ("bad base64", {"messages": _img("data:image/png;base64,@@@@")}, None, 400, "invalid_image", None),
    ("remote image url", {"messages": _img("http://example.com/x.png")}, None, 400, "invalid_image", None),
    ("negative temperature", {"messages": TEXT, "temperature": -1}, None, 400, "invalid_value", "temperature"),
    ("string temperature", {"messages": TEXT, "temperature": "hot"}, None, 400, "invalid_value", "temperature"),
    ("top_p zero", {"messages": TEXT, "top_p": 0}, None, 400, "invalid_value", "top_p"),
    ("max_tokens zero", {"messages": TEXT, "max_tokens": 0}, None, 400, "invalid_value", "max_tokens"),
    ("max_tokens over limit", {"messages": TEXT, "max_tokens": 10_000}, None, 400, "invalid_value", "max_tokens"),
    ("n zero", {"messages": TEXT, "n": 0}, None, 400, "invalid_value", "n"),
    ("n float", {"messages": TEXT, "n": 1.5}, None, 400, "invalid_value", "n"),
    ("bad stop", {"messages": TEXT, "stop": ["a", "b", "c", "d", "e"]}, None, 400, "invalid_value", "stop"),
    ("stream not bool", {"messages": TEXT, "stream": "yes"}, None, 400, "invalid_value", "stream"),
    ("stream_options without stream", {"messages": TEXT, "stream_options": {"include_usage": True}}, None, 400,
     "invalid_value", "stream_options"),
    ("top_logprobs without logprobs", {"messages": TEXT, "top_logprobs": 2}, None, 400, "invalid_value",
     "top_logprobs"),
    ("top_logprobs too many", {"messages": TEXT, "logprobs": True, "top_logprobs": 21}, None, 400, "invalid_value",
     "top_logprobs"),
    ("response_format json", {"messages": TEXT, "response_format": {"type": "json_object"}}, None, 400,
     "unsupported_parameter", "response_format"),
    ("tools", {"messages": TEXT, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400,
     "unsupported_parameter", "tools"),
    ("over-long prompt", {"messages": [{"role": "user", "content": "zq " * 5000}]}, None, 400,
     "context_length_exceeded", "messages"),
    # issue 14.12: a deeply nested body used to get no response at all (uncaught RecursionError)
    ("100000-deep nesting", None, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
]


@pytest.mark.parametrize("name,body,raw,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, name, body, raw, status, code, param):
    got, err = request(server.url + "/v1/chat/completions", body, raw=raw, method="POST")
    assert got == status, (name, err)
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    if code:
        assert err["error"]["code"] == code, err
    if param:
        assert err["error"]["param"] == param, err
    assert chat(server, TEXT, max_tokens=2).choices


def test_unsupported_parameters_through_the_client(server):
    with pytest.raises(openai.BadRequestError) as exc:
        chat(server, TEXT, max_tokens=2, response_format={"type": "json_object"})
    assert exc.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as exc:
        chat(server, TEXT, max_tokens=2, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert exc.value.body["param"] == "tools"


def test_unknown_route_is_404_json(server):
    status, err = request(server.url + "/v1/completions", {"prompt": "x"})
    assert status == 404 and err["error"]["code"] == "not_found"


def test_api_key_checked(server):
    assert request(server.keyed + "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.keyed + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tiny", messages=TEXT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.keyed + "/v1", api_key=server.key + "x" * 100, max_retries=0).models.list()
    assert server.keyed_client.chat.completions.create(model="tiny", messages=TEXT, max_tokens=2).choices
    assert request(server.keyed + "/health")[0] == 200


# ------------------------------------------------------------------------------------------------ concurrency

def test_concurrent_requests_are_batched_and_match_sequential(server):
    """Requests arriving while a batch runs are generated together next (continuous batching), with the same
    greedy answers as one by one."""
    url, engine = server.url, server.engine
    prompts = [[{"role": "user", "content": f"Count to {i}, then say {'x' * i}."}] for i in range(6)]
    sequential = [chat(server, p, max_tokens=6, temperature=0).choices[0].message.content for p in prompts]
    before = (engine.stats.batches, engine.stats.requests)
    results: dict = {}
    barrier = threading.Barrier(6)

    def worker(i):
        barrier.wait()
        results[i] = request(url + "/v1/chat/completions", {"messages": prompts[i], "max_tokens": 6,
                                                            "temperature": 0})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(results[i][0] == 200 for i in range(6)), results
    batches, requests = engine.stats.batches - before[0], engine.stats.requests - before[1]
    assert requests == 6 and batches < 6, (batches, requests)
    assert engine.stats.max_batch_requests >= 2
    assert [results[i][1]["choices"][0]["message"]["content"] for i in range(6)] == sequential


# ------------------------------------------------------------------------------------------------ TAS

def test_tas_matches_direct_score_policy(server, media_dir):
    """/v1/tas on a generated answer == score_policy + sequence_attention_reward on the trainer's prompt batch."""
    from megatron_sayo.config import DataConfig, RewardConfig
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.synthetic import make_synthetic
    from megatron_sayo.eval.byob_grounded import byob_rows, prompt_text
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.prompts import build_prompt_batch
    from megatron_sayo.rl.rewards import sequence_attention_reward
    from megatron_sayo.rl.scoring import score_policy

    url, engine = server.url, server.engine
    sample = load_grounded(make_synthetic(media_dir / "syn", 1))[0]
    instruction = DataConfig().instruction
    row = byob_rows([sample], instruction, "normalized")[0]
    messages = [{"role": "user", "content": prompt_text(row)}]
    answer = chat(server, messages, max_tokens=12, temperature=0).choices[0].message.content
    status, got = request(url + "/v1/tas", {"messages": messages, "completion": answer, "boxes": sample.boxes})
    assert status == 200, got
    assert got["completion_source"] == "generated"

    hf, proc = engine.hf, engine.processor
    prompts = build_prompt_batch(proc, [sample], hf.tokens.image, hf.vision.spatial_merge_size,
                                 hf.vision.patch_size, instruction)
    ids = prompts.inputs["input_ids"]
    completion = engine.generated_ids(ids[0].tolist(), answer)
    assert completion is not None and len(completion) == got["completion_tokens"]
    batch = ScoringBatch.teacher_forced(hf, prompts.inputs, prompts.region_mask, [completion], 0)
    scores = score_policy(engine.model, batch, 1, 1.0)
    cfg = RewardConfig()
    reward, tas, _ = sequence_attention_reward(scores, cfg.top_entropy_ratio, cfg.attention_form, cfg.eps)
    assert got["region_tokens"] == int(prompts.region_mask.sum()) > 0
    assert math.isclose(got["tas"], float(tas[0]), rel_tol=1e-5)
    assert math.isclose(got["reward_attention"], float(reward[0]), rel_tol=1e-5)


@pytest.mark.parametrize("body,param", [
    ({"completion": "x", "boxes": [[0, 0, 5, 5]]}, "messages"),
    ({"messages": TEXT, "completion": "x", "boxes": [[0, 0, 5, 5]]}, "messages"),     # no image
    ({"messages": _img("/nonexistent.png"), "completion": "x", "boxes": [[0, 0, 5, 5]]}, None),
    ({"messages": TEXT, "completion": "x" * 30_000, "boxes": [[0, 0, 5, 5]]}, "completion"),
    ({"messages": TEXT, "completion": "", "boxes": [[0, 0, 5, 5]]}, "completion"),
    ({"messages": TEXT, "completion": "x", "boxes": [[0, 0, 5]]}, "boxes"),
])
def test_tas_bad_requests(server, body, param):
    status, err = request(server.url + "/v1/tas", body)
    assert status == 400, err
    if param:
        assert err["error"]["param"] == param


@pytest.mark.parametrize("completion,named", [("It is <|image_pad|> there.", "<|image_pad|>"),
                                              ("<|vision_start|>a<|video_pad|>", "<|video_pad|>, <|vision_start|>")])
def test_tas_completion_holding_vision_tokens_is_a_400_naming_them(server, make_image, completion, named):
    """A completion with vision placeholders (no pixels behind them) is refused before the model runs."""
    import base64
    import io

    buf = io.BytesIO()
    make_image(56, 56, seed=5).save(buf, format="PNG")
    messages = _img("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    failed = server.engine.stats.failed_requests
    status, err = request(server.url + "/v1/tas", {"messages": messages, "completion": completion,
                                                  "boxes": [[0, 0, 28, 28]]})
    assert status == 400 and err["error"]["param"] == "completion", err
    assert err["error"]["message"].startswith(f"'completion' holds {named}: "), err
    assert server.engine.stats.failed_requests == failed
