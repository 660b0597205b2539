"""Write-then-rename: a file or a finished directory appears under its final name complete or not at all.
Torch-free."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """fsync a directory (its entries survive a crash); silently skipped where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` via `.<name>.tmp-<pid>` in the same directory, fsync (unless told not to: caches
    that can be rebuilt), rename: readers never see half a file; the temp file is removed when writing fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """JSON (indented, sorted keys) written with write_bytes_atomic."""
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def publish_dir(tmp: str | Path, out: str | Path) -> Path:
    """Move a finished temp dir onto `out`, replacing an old one only now that the new one is complete."""
    tmp, out = Path(tmp), Path(out)
    fsync_dir(tmp)
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
    return out
