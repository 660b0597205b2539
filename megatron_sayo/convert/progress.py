"""What a long conversion shows and how it stops: a byte-size format, a tqdm bar (or none), SIGTERM raised
as an interruption so the temp dir is removed, a tool's exit code, and a failure injected after n tensors (tests)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable


def bytes_fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


class Terminated(KeyboardInterrupt):
    """SIGTERM received: raised in the main thread so the conversion's clean-up runs as for Ctrl-C."""


def run_conversion(convert: Callable[[], dict]) -> tuple[dict | None, int]:
    """convert() as a conversion tool runs it: (its summary, 0), or (None, exit code) once stderr says why:
    2 for a bad checkpoint or config, 130 on SIGINT, 143 on SIGTERM (the temp dir is already removed)."""
    from megatron_sayo.checkpoint.files import CheckpointError
    from megatron_sayo.models.qwen25vl.hf_config import ConfigError

    try:
        return convert(), 0
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}): nothing written", file=sys.stderr)
        return None, 143 if isinstance(exc, Terminated) else 130


@contextlib.contextmanager
def terminate_as_interrupt():
    """While converting, SIGTERM raises Terminated (SIGINT already raises KeyboardInterrupt), so the temp dir
    is removed instead of left behind; the previous handler is restored after. No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Progress:
    """tqdm when available and wanted, else silent; counts tensors and carries a bytes total."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bytes_done = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix_str(self, s: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(s, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class FailAfter:
    """Progress wrapper that raises after n tensors: simulates a conversion killed mid-way (tests)."""

    def __init__(self, bar, n: int):
        self.bar, self.n, self.bytes_done = bar, n, 0

    def update(self, k: int) -> None:
        self.n -= k
        if self.n < 0:
            raise RuntimeError("simulated interruption")

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


