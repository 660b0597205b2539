"""Write-then-rename: a failed write leaves the old file and no temp file; a published dir replaces the old one
only whole."""

from __future__ import annotations

import json

import pytest

from megatron_sayo.formats.atomic import publish_dir, write_bytes_atomic, write_json_atomic


def test_write_bytes_atomic_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_bytes_atomic(path, {"not": "bytes"})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    write_bytes_atomic(path, b"x", fsync=False)
    assert path.read_bytes() == b"x"


def test_publish_dir_replaces_an_old_dir(tmp_path):
    out = tmp_path / "out"
    for content in ("old", "new"):
        tmp = tmp_path / f"out.tmp-{content}"
        tmp.mkdir()
        (tmp / "f").write_text(content)
        publish_dir(tmp, out)
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
