"""A prepared data set's output folder, published atomically: built in a temporary sibling, renamed at the end.

The preparation tools never write into, or delete, a folder they did not create: an existing output is refused
(the user moves it away), a failed run removes only its own temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output folder is already there."""


@contextmanager
def new_dataset_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; rename it to `out` when the block finishes without error."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise OutputExistsError(f"{out}: exists; refusing to write a prepared data set over it (choose a new --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)   # an empty `out` created meanwhile would be replaced; a non-empty one fails
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_rows(rows: list[dict], out_dir: Path, published: Path | None = None) -> tuple[int, int]:
    """Write rows to out_dir/data.jsonl through the shared row validator; return (written, dropped).

    Each dropped row is logged with its reason, naming `published`/data.jsonl (the folder out_dir becomes)
    and the row's number among those prepared; an image this preparation copied into out_dir/images/ for a
    dropped row is removed (it is the run's own file, inside its temporary folder)."""
    import logging

    from megatron_sayo.data.grounded import write_jsonl

    errors = write_jsonl(rows, out_dir / "data.jsonl")
    target = Path(published or out_dir) / "data.jsonl"
    for err in errors:
        sid = f" (id {err.sample_id!r})" if err.sample_id else ""
        logging.getLogger(__name__).warning("%s: prepared row %d%s dropped, not written: %s", target, err.line, sid,
                                            err.row_error)
        image = rows[err.line - 1].get("image")
        if isinstance(image, str) and image.startswith("images/"):
            (out_dir / image).unlink(missing_ok=True)
    return len(rows) - len(errors), len(errors)
