"""Fixtures of the server tests: in-process servers over the tiny checkpoint (loopback, free ports)."""

from __future__ import annotations

import threading

import openai
import pytest

from megatron_sayo.eval.media import MediaPolicy
from megatron_sayo.eval.openai_api import Limits

KEY = "sekrit"


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def server(tiny_ckpt, media_dir):
    """In-process servers (rank 0 of a 1-process group) on free loopback ports sharing one scheduler: `url`
    (local media allowed in media_dir), `keyed` (API key, local media off). Yields a namespace."""
    from types import SimpleNamespace

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.distributed import runtime
    from megatron_sayo.eval.api_server import ServerState
    from megatron_sayo.eval.engine import Engine
    from megatron_sayo.eval.scheduler import Scheduler
    from megatron_sayo.eval.serve import start_http

    runtime.init_distributed(1, 1, launch=runtime.LaunchEnv(0, 1, 0, "127.0.0.1", runtime.free_port(), "single"))
    engine = Engine(load_model_stage(tiny_ckpt), Processor.from_pretrained(tiny_ckpt))
    scheduler = Scheduler(engine, max_batch=16)
    worker = threading.Thread(target=scheduler.serve_forever, daemon=True)
    worker.start()
    limits = Limits(max_len=engine.max_len, max_tokens=64, default_max_tokens=8, max_images=3, max_prompt_chars=20_000,
                    media=MediaPolicy(media_dir, max_image_pixels=100_000))
    open_state = ServerState(scheduler, engine.processor, limits, "tiny", None, max_body_bytes=1 << 20,
                             read_timeout_s=1.0)
    keyed_state = ServerState(scheduler, engine.processor, Limits(max_len=engine.max_len, max_tokens=64), "tiny", KEY,
                              max_body_bytes=1 << 20, read_timeout_s=1.0)
    http = start_http(open_state, "127.0.0.1", 0, read_timeout_s=1.0, max_connections=64)
    keyed = start_http(keyed_state, "127.0.0.1", 0, read_timeout_s=1.0)
    url, keyed_url = f"http://127.0.0.1:{http.port}", f"http://127.0.0.1:{keyed.port}"
    ns = SimpleNamespace(key=KEY, url=url, keyed=keyed_url, engine=engine, scheduler=scheduler, http=http,
                         client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120),
                         keyed_client=openai.OpenAI(base_url=keyed_url + "/v1", api_key=KEY, max_retries=0,
                                                    timeout=120))
    yield ns
    scheduler.stopped.set()
    worker.join(timeout=30)
    http.stop()
    keyed.stop()
    runtime.shutdown()


