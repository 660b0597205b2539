"""Reading JSON files with errors that name the file and say what was expected."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError, default_name: str | None = None):
    """Parsed JSON of `path` (or of `path/default_name` when `path` is a directory).

    A missing file raises FileNotFoundError, unparsable JSON `error`; both messages name the file and `what`.
    """
    path = Path(path)
    if default_name and path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
