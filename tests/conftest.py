"""Shared fixtures: tiny random Qwen2.5-VL checkpoints (made in-process) and random images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def launch_environment_unchanged():
    """A test (or the code it runs in this process) must not leave a rank's launch variables behind: every later
    subprocess would inherit them and rendezvous on a port that may still be held (EADDRINUSE in unrelated tests)."""
    import os

    before = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    yield
    after = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    assert after == before, f"launch variables left in this process's environment: {before} -> {after}"


UNMARKED_STARTS: list[str] = []   # tests that started a process without the multiproc marker (this session)


@pytest.fixture(autouse=True)
def _note_unmarked_process_starts(request, monkeypatch):
    """Record a test without the multiproc marker that starts a process (listed at the end of the session)."""
    if request.node.get_closest_marker("multiproc") is not None:
        yield
        return
    import multiprocessing.process
    import subprocess

    started = []
    popen_start, process_start = subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start
    monkeypatch.setattr(subprocess.Popen, "_execute_child",
                        lambda self, *a, **k: started.append(1) or popen_start(self, *a, **k))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        lambda self: started.append(1) or process_start(self))
    yield
    if started:
        UNMARKED_STARTS.append(request.node.nodeid)


def pytest_terminal_summary(terminalreporter):
    if UNMARKED_STARTS:
        terminalreporter.section("tests that started processes without @pytest.mark.multiproc")
        for nodeid in UNMARKED_STARTS:
            terminalreporter.write_line(nodeid)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """HF checkpoint dir of preset 'tiny' (GQA 4/2 heads, untied, vocab 512), seed 0, float32."""
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_ckpt(tmp_path_factory) -> Path:
    """HF checkpoint dir of preset 'tiny-tied' (MHA, tied embeddings, vocab 400), seed 0, float32."""
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-tied", preset="tiny-tied", seed=0)


@pytest.fixture(scope="session")
def make_image():
    """make_image(w, h, seed=0) -> random RGB PIL image of width w and height h."""
    def make(w: int, h: int, seed: int = 0) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return make
