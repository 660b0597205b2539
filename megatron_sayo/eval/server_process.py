"""Our OpenAI-compatible server as a subprocess of the evaluator: start it on a free loopback port with a fresh
API key, wait for /health, talk JSON to it, stop its whole process group.

The child is `sys.executable -m megatron_sayo.eval.serve`: it imports the package the way this process does
(installed, or on the caller's own import path); nothing here edits the import path.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.eval.errors import EvalError


def http_json(url: str, body: dict | None = None, api_key: str | None = None, timeout: float = 600.0):
    """(status, JSON) of a GET (body None) or POST to our server."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class ServerProcess:
    """A running `megatron_sayo.eval.serve` subprocess (own process group) and how to reach it."""

    proc: subprocess.Popen
    url: str          # base URL, ends with /v1
    api_key: str
    log_path: Path

    @property
    def health_url(self) -> str:
        return self.url.removesuffix("/v1") + "/health"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it does not exit in time."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def source_args(hf: str | None, megatron: str | None) -> list[str]:
    """--hf DIR or --megatron DIR for the server command line."""
    return ["--hf", str(hf)] if hf else ["--megatron", str(megatron)]


def local_media_root(image_paths) -> str:
    """The deepest directory holding every image: the only local media the server is allowed to open."""
    return os.path.commonpath([str(Path(p).resolve().parent) for p in image_paths])


def tail(path: Path, n: int = 20) -> str:
    """The last n lines of a text file."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_server(hf: str | None, megatron: str | None, tp: int, log_path: Path, startup_s: float = 900.0,
                 extra_args: list[str] | None = None) -> ServerProcess:
    """Start the server on a free loopback port with a fresh API key; return once /health answers."""
    from megatron_sayo.distributed.runtime import free_port

    port, key = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "megatron_sayo.eval.serve", *source_args(hf, megatron), "--tp", str(tp),
           "--host", "127.0.0.1", "--port", str(port), *(extra_args or [])]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SAYO_API_KEY": key}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}/v1", key, log_path)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EvalError(f"the server exited with code {proc.returncode} during start-up; its log "
                            f"({log_path}) ends with:\n{tail(log_path)}")
        try:
            if http_json(server.health_url, timeout=2)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise EvalError(f"the server did not answer /health within {startup_s:.0f}s; log: {log_path}")
