"""Server throughput: requests/s and tokens/s under 1, 4 and 16 concurrent clients, next to sequential generation.

    python benchmarks/serve.py [--hf DIR] [--requests 32] [--max-tokens 16] [--clients 1 4 16]

Without --hf a tiny random checkpoint is made in a temp dir. The server runs as a subprocess
(python -m megatron_sayo.eval.serve); "sequential" is processor + one `generate` call per request in this process on the
same checkpoint (no HTTP, no batching). Each client sends greedy image+text requests (bodies built beforehand)
back to back with fixed max_tokens and no stop token (a tiny random model rarely stops; tokens are counted from
usage). The modes are interleaved over --rounds rounds and each round's ratio server tokens/s / sequential
tokens/s is taken against that round's sequential run (the shared machine's load drifts); medians are printed.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
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


def run_clients(url: str, key: str, clients: int, bodies: list[dict]) -> tuple[float, int]:
    """(seconds, completion tokens) for the request bodies (built beforehand) spread over `clients` threads."""
    counter, lock, tokens, errors = iter(range(len(bodies))), threading.Lock(), [0], []

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, body = http_json(url + "/chat/completions", bodies[i], key)
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


class Sequential:
    """The no-server, no-batching baseline: one in-process `generate` call per request on the same checkpoint."""

    def __init__(self, hf_dir: str, max_tokens: int):
        from megatron_sayo.checkpoint.loader import load_model_stage
        from megatron_sayo.data.processor import Processor
        from megatron_sayo.distributed import runtime
        from megatron_sayo.inference.sampling import SamplingParams

        runtime.init_distributed(1, 1, launch=runtime.LaunchEnv(0, 1, 0, "127.0.0.1", runtime.free_port(), "single"))
        self.model, self.proc = load_model_stage(hf_dir), Processor.from_pretrained(hf_dir)
        self.params = SamplingParams(greedy=True, max_new_tokens=max_tokens)
        self.run([conversation(0)])   # warm-up

    def run(self, conversations: list) -> tuple[float, int]:
        """(seconds, tokens): processor + generate per conversation."""
        import torch

        from megatron_sayo.inference.decode import generate

        tokens, t0 = 0, time.perf_counter()
        with torch.no_grad():
            for conv in conversations:
                tokens += int(generate(self.model, self.proc([conv]), self.params).completion_lengths.sum())
        return time.perf_counter() - t0, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", default=None, help="HF checkpoint to serve (default: a tiny random one)")
    p.add_argument("--requests", type=int, default=32, help="requests per round")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent client counts to measure")
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server (fair comparison)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (sequential, then each client count)")
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
    n = args.requests
    bodies = [{"messages": messages(i), "max_tokens": args.max_tokens, "temperature": 0} for i in range(n)]
    conversations = [conversation(i) for i in range(n)]
    baseline = Sequential(hf, args.max_tokens)
    server = start_server(hf, None, 1, Path(tmp.name) / "server.log", extra_args=["--max-batch", "16"])
    modes = ["sequential"] + [f"server, {c} clients" for c in args.clients]
    rates: dict[str, list[float]] = {m: [] for m in modes}     # tokens/s per round
    rps: dict[str, list[float]] = {m: [] for m in modes}       # requests/s per round
    ratios: dict[str, list[float]] = {m: [] for m in modes}    # vs the sequential run of the same round
    try:
        run_clients(server.url, server.api_key, 2, bodies[:4])   # warm-up
        for _ in range(args.rounds):                             # interleaved: every mode once per round
            s, tok = baseline.run(conversations)
            rates["sequential"].append(tok / s)
            rps["sequential"].append(n / s)
            for c in args.clients:
                s, tok = run_clients(server.url, server.api_key, c, bodies)
                rates[f"server, {c} clients"].append(tok / s)
                rps[f"server, {c} clients"].append(n / s)
            for m in modes:
                ratios[m].append(rates[m][-1] / rates["sequential"][-1])
        stats = http_json(server.health_url)[1]
    finally:
        server.stop()
    print(f"{n} requests x {args.max_tokens} new tokens (greedy, image 112x112), model {Path(hf).name}, "
          f"{args.threads} torch thread(s), {args.rounds} interleaved rounds (medians)")
    print("| mode | requests/s | tokens/s | tokens/s vs sequential (same round) |\n|---|---|---|---|")
    for m in modes:
        tps = statistics.median(rates[m])
        print(f"| {m} | {statistics.median(rps[m]):.2f} | {tps:.1f} | {statistics.median(ratios[m]):.2f}x "
              f"({min(ratios[m]):.2f}-{max(ratios[m]):.2f}) |")
    print(f"server: {stats['batches']} batches for {stats['requests']} requests, largest {stats['max_batch_requests']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
