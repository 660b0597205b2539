"""Server throughput: requests/s and tokens/s under 1, 4 and 16 concurrent clients, next to sequential generation.

    python benchmarks/serve.py [--hf DIR] [--requests 32] [--max-tokens 16] [--clients 1 4 16]

Without --hf a tiny random checkpoint is made in a temp dir. The server runs as a subprocess
(python -m megatron_sayo.eval.serve); "sequential" is one `generate` call per request in this process on the same
checkpoint (no HTTP, no batching). Each client sends greedy image+text requests back to back with fixed
max_tokens and no stop token (ignore_eos is emulated by a tiny model that rarely stops; tokens are counted from
usage). Prints a table with the batching gain = server tokens/s / sequential tokens/s.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.eval.server_process import http_json, start_server  # noqa: E402


def image(seed: int) -> Image.Image:
    """A random 112x112 RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))


def image_url(seed: int) -> str:
    """image(seed) as a PNG data URL."""
    buf = io.BytesIO()
    image(seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def question(i: int) -> str:
    return f"Question {i}: what is in the image?"


def messages(i: int) -> list[dict]:
    """Request i in OpenAI form (what a client sends)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(i % 4)}},
                                         {"type": "text", "text": question(i)}]}]


def conversation(i: int) -> list[dict]:
    """Request i as the processor's conversation (what the sequential baseline generates from)."""
    return [{"role": "user", "content": [{"type": "image", "image": image(i % 4)},
                                         {"type": "text", "text": question(i)}]}]


def run_clients(url: str, key: str, clients: int, total: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) for `total` requests spread over `clients` threads."""
    counter, lock, tokens, errors = iter(range(total)), threading.Lock(), [0], []

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, body = http_json(url + "/chat/completions", {"messages": messages(i), "max_tokens": max_tokens,
                                                                  "temperature": 0}, key)
            if status != 200:
                errors.append(body)
                return
            with lock:
                tokens[0] += body["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return time.perf_counter() - t0, tokens[0]


def sequential(hf_dir: str, total: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, tokens) of one in-process generate call per request (the no-server, no-batching baseline)."""
    import torch

    from megatron_sayo.distributed import runtime
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.models.qwen25vl.model import load_from_hf
    from megatron_sayo.rl.rollout import SamplingParams, generate

    runtime.init_distributed(1, 1, launch=runtime.LaunchEnv(0, 1, 0, "127.0.0.1", runtime.free_port(), "single"))
    model, proc = load_from_hf(hf_dir), Processor.from_pretrained(hf_dir)
    params = SamplingParams(greedy=True, max_new_tokens=max_tokens)
    generate(model, proc([conversation(0)]), params)   # warm-up
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(total):
            out = generate(model, proc([conversation(i)]), params)
            tokens += int(out.completion_lengths.sum())
    runtime.shutdown()
    return time.perf_counter() - t0, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server (fair comparison)")
    args = p.parse_args(argv)
    import os

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    tmp = tempfile.TemporaryDirectory()
    hf = args.hf
    if hf is None:
        from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

        hf = str(make_tiny_checkpoint(Path(tmp.name) / "tiny", preset="tiny", seed=0))
    seq_s, seq_tok = sequential(hf, args.requests, args.max_tokens)
    rows = [("sequential generate", 1, args.requests / seq_s, seq_tok / seq_s, 1.0)]
    server = start_server(hf, None, 1, Path(tmp.name) / "server.log", extra_args=["--max-batch", "16"])
    try:
        run_clients(server.url, server.api_key, 2, 4, args.max_tokens)   # warm-up
        for c in args.clients:
            s, tok = run_clients(server.url, server.api_key, c, args.requests, args.max_tokens)
            rows.append((f"server, {c} clients", c, args.requests / s, tok / s, (tok / s) / (seq_tok / seq_s)))
        stats = http_json(server.url.removesuffix("/v1") + "/health")[1]
    finally:
        server.stop()
    print(f"{args.requests} requests x {args.max_tokens} new tokens (greedy, image 112x112), model {Path(hf).name}, "
          f"{args.threads} torch thread(s)")
    print("| mode | clients | requests/s | tokens/s | tokens/s vs sequential |\n|---|---|---|---|---|")
    for name, c, rps, tps, gain in rows:
        print(f"| {name} | {c} | {rps:.2f} | {tps:.1f} | {gain:.2f}x |")
    print(f"server: {stats['batches']} batches for {stats['requests']} requests, largest {stats['max_batch_requests']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
