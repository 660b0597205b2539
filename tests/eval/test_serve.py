"""OpenAI-compatible server: good requests, every bad request (4xx + OpenAI error JSON, still serving after),
API key, concurrent requests batched (server stats) with the same greedy answers as one by one, and /v1/tas
against a direct score_policy computation built through the trainer's prompt path."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import urllib.error
import urllib.request

import pytest

from megatron_sayo.eval.openai_api import Limits

TEXT = [{"role": "user", "content": "Say something."}]


def request(url: str, body=None, raw: bytes | None = None, key: str | None = None, method=None):
    """(status, JSON body) of one HTTP call."""
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


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    """An in-process server (rank 0 of a 1-process group) on a free loopback port; yields (base URL, engine)."""
    from megatron_sayo.distributed import runtime
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.eval.engine import Engine
    from megatron_sayo.eval.serve import Scheduler, ServerState, start_http
    from megatron_sayo.checkpoint.loader import load_model_stage

    runtime.init_distributed(1, 1, launch=runtime.LaunchEnv(0, 1, 0, "127.0.0.1", runtime.free_port(), "single"))
    engine = Engine(load_model_stage(tiny_ckpt), Processor.from_pretrained(tiny_ckpt))
    scheduler = Scheduler(engine, window_s=0.1, max_batch=16)
    worker = threading.Thread(target=scheduler.serve_forever, daemon=True)
    worker.start()
    limits = Limits(max_len=engine.max_len, max_tokens=64, default_max_tokens=8)
    httpd = start_http(ServerState(scheduler, engine.processor, limits, "tiny", None), "127.0.0.1", 0)
    keyed = start_http(ServerState(scheduler, engine.processor, limits, "tiny", "sekrit"), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{httpd.server_address[1]}", engine, f"http://127.0.0.1:{keyed.server_address[1]}"
    scheduler.stopped.set()
    worker.join(timeout=30)
    httpd.shutdown()
    keyed.shutdown()
    runtime.shutdown()


def chat(url, messages, **params):
    return request(url + "/v1/chat/completions", {"model": "tiny", "messages": messages, **params})


# ------------------------------------------------------------------------------------------------ good requests

def test_text_request_has_openai_shape(server):
    url, _, _ = server
    status, body = chat(url, TEXT, max_tokens=5, temperature=0)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 5 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_image_as_data_url_path_file_url_and_tag_agree(server, make_image, tmp_path):
    """One image sent four ways gives the same prompt, hence the same greedy completion."""
    url, _, _ = server
    image = make_image(60, 44, seed=3)
    path = tmp_path / "im.png"
    image.save(path)
    outs = []
    for ref in (png_data_url(image), str(path), f"file://{path}"):
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}},
                                            {"type": "text", "text": "What is it?"}]}]
        status, body = chat(url, msg, max_tokens=6, temperature=0)
        assert status == 200, body
        outs.append((body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]))
    status, body = chat(url, [{"role": "user", "content": f"<image_url>{path}</image_url>What is it?"}],
                        max_tokens=6, temperature=0)
    assert status == 200, body
    outs.append((body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]))
    assert len(set(outs)) == 1, outs
    assert outs[0][1] > 20   # the image's pad tokens are in the prompt


def test_n_choices_stop_and_system_message(server, make_image):
    url, _, _ = server
    msg = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(make_image(56, 56))}},
                                        {"type": "text", "text": "Describe."}]}]
    status, body = chat(url, msg, n=3, max_tokens=6, temperature=0.9, top_p=0.9, seed=7)
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    status, greedy = chat(url, TEXT, max_tokens=8, temperature=0)
    text = greedy["choices"][0]["message"]["content"]
    stop = text[2:4] if len(text) >= 4 else None
    if stop:
        status, body = chat(url, TEXT, max_tokens=8, temperature=0, stop=[stop])
        assert status == 200
        assert body["choices"][0]["message"]["content"] == text[:text.find(stop)]
        assert body["choices"][0]["finish_reason"] == "stop"


def test_models_and_health(server):
    url, _, _ = server
    status, body = request(url + "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny"
    status, body = request(url + "/health")
    assert status == 200 and body["status"] == "ok" and "batches" in body


# ------------------------------------------------------------------------------------------------ bad requests

def _img(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]


BAD = [
    ("malformed JSON", None, b"{not json", 400, "invalid_json"),
    ("empty body", None, b"", 400, None),
    ("body not an object", [1, 2], None, 400, None),
    ("missing messages", {"model": "tiny"}, None, 400, "missing_required_parameter"),
    ("messages not a list", {"messages": "hi"}, None, 400, None),
    ("empty messages", {"messages": []}, None, 400, None),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, None),
    ("missing content", {"messages": [{"role": "user"}]}, None, 400, None),
    ("last not user", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     None, 400, None),
    ("bad part type", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, None, 400, None),
    ("undecodable image", {"messages": _img("data:image/png;base64," + base64.b64encode(b"not a png").decode())},
     None, 400, "invalid_image"),
    ("bad base64", {"messages": _img("data:image/png;base64,@@@@")}, None, 400, "invalid_image"),
    ("missing image file", {"messages": _img("/nonexistent/x.png")}, None, 400, "invalid_image"),
    ("remote image url", {"messages": _img("http://example.com/x.png")}, None, 400, "invalid_image"),
    ("negative temperature", {"messages": TEXT, "temperature": -1}, None, 400, "invalid_value"),
    ("string temperature", {"messages": TEXT, "temperature": "hot"}, None, 400, "invalid_value"),
    ("top_p zero", {"messages": TEXT, "top_p": 0}, None, 400, "invalid_value"),
    ("max_tokens zero", {"messages": TEXT, "max_tokens": 0}, None, 400, "invalid_value"),
    ("max_tokens over limit", {"messages": TEXT, "max_tokens": 10_000}, None, 400, "invalid_value"),
    ("n zero", {"messages": TEXT, "n": 0}, None, 400, "invalid_value"),
    ("n float", {"messages": TEXT, "n": 1.5}, None, 400, "invalid_value"),
    ("bad stop", {"messages": TEXT, "stop": ["a", "b", "c", "d", "e"]}, None, 400, "invalid_value"),
    ("stream", {"messages": TEXT, "stream": True}, None, 400, "unsupported_parameter"),
    ("over-long prompt", {"messages": [{"role": "user", "content": "zq " * 5000}]}, None, 400,
     "context_length_exceeded"),
]


@pytest.mark.parametrize("name,body,raw,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, name, body, raw, status, code):
    url, _, _ = server
    got, err = request(url + "/v1/chat/completions", body, raw=raw, method="POST")
    assert got == status, (name, err)
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    if code:
        assert err["error"]["code"] == code, err
    ok, body = chat(url, TEXT, max_tokens=2)
    assert ok == 200, body


def test_unknown_route_is_404_json(server):
    url, _, _ = server
    status, err = request(url + "/v1/completions", {"prompt": "x"})
    assert status == 404 and err["error"]["code"] == "not_found"


def test_api_key_checked(server):
    _, _, keyed = server
    assert request(keyed + "/v1/models")[0] == 401
    status, err = request(keyed + "/v1/chat/completions", {"messages": TEXT}, key="wrong")
    assert status == 401 and err["error"]["type"] == "authentication_error"
    assert request(keyed + "/v1/chat/completions", {"messages": TEXT, "max_tokens": 2}, key="sekrit")[0] == 200
    assert request(keyed + "/health")[0] == 200


# ------------------------------------------------------------------------------------------------ concurrency

def test_concurrent_requests_are_batched_and_match_sequential(server):
    url, engine, _ = server
    prompts = [[{"role": "user", "content": f"Count to {i}, then say {'x' * i}."}] for i in range(6)]
    sequential = [chat(url, p, max_tokens=6, temperature=0)[1]["choices"][0]["message"]["content"] for p in prompts]
    before = (engine.stats.batches, engine.stats.requests)
    results: dict = {}
    barrier = threading.Barrier(6)

    def worker(i):
        barrier.wait()
        results[i] = chat(url, prompts[i], max_tokens=6, temperature=0)

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

def test_tas_matches_direct_score_policy(server, tmp_path):
    """/v1/tas on a generated answer == score_policy + sequence_attention_reward on the trainer's prompt batch."""
    from megatron_sayo.config import DataConfig, RewardConfig
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.synthetic import make_synthetic
    from megatron_sayo.eval.byob_grounded import byob_rows, prompt_text
    from megatron_sayo.rl.prompts import build_prompt_batch
    from megatron_sayo.rl.rewards import sequence_attention_reward
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.scoring import score_policy

    url, engine, _ = server
    sample = load_grounded(make_synthetic(tmp_path / "syn", 1))[0]
    instruction = DataConfig().instruction
    row = byob_rows([sample], instruction, "normalized")[0]
    messages = [{"role": "user", "content": prompt_text(row)}]
    status, body = chat(url, messages, max_tokens=12, temperature=0)
    assert status == 200
    answer = body["choices"][0]["message"]["content"]
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
    ({"messages": TEXT, "completion": "", "boxes": [[0, 0, 5, 5]]}, "completion"),
    ({"messages": TEXT, "completion": "x", "boxes": [[0, 0, 5]]}, "boxes"),
])
def test_tas_bad_requests(server, body, param):
    url, _, _ = server
    status, err = request(url + "/v1/tas", body)
    assert status == 400, err
    if param:
        assert err["error"]["param"] == param
