"""Issue 14 items 7-9: local media off by default and confined to --allowed-local-media-path after resolving
links, with one message for every refused path; image headers checked against --max-image-pixels before any
decoding; images per request and prompt text bounded before decoding or tokenizing."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import urllib.error
import urllib.request
import zlib

import pytest

from megatron_sayo.eval.errors import ApiError
from megatron_sayo.eval.media import REFUSED, MediaPolicy, load_image


def post(url: str, body: dict, key: str | None = None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def image_msg(ref: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}},
                                         {"type": "text", "text": "?"}]}]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which holds no pixel data (decoding it fails)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def outside(tmp_path_factory, make_image):
    """A readable image outside the allowed dir."""
    path = tmp_path_factory.mktemp("outside") / "secret.png"
    make_image(40, 40, seed=9).save(path)
    os.chmod(path, 0o600)
    return path


def test_refused_paths_share_one_message(server, media_dir, outside, make_image):
    """Absolute, file://, ../, symlinked, missing and directory paths, as parts and as <image_url> tags, on
    /v1/chat/completions and /v1/tas: all refused with the same message (no existence oracle)."""
    make_image(32, 32).save(media_dir / "ok.png")
    (media_dir / "link.png").unlink(missing_ok=True)
    (media_dir / "link.png").symlink_to(outside)
    (media_dir / "sub").mkdir(exist_ok=True)
    rel = os.path.relpath(outside, media_dir)
    refs = [str(outside), f"file://{outside}", rel, f"{media_dir}/../{outside.parent.name}/{outside.name}",
            str(media_dir / "link.png"), "link.png", str(media_dir / "missing.png"), "missing.png",
            str(media_dir / "sub"), "/etc/shadow", "/nonexistent/x.png"]
    messages = set()
    for ref in refs:
        for msg in (image_msg(ref), [{"role": "user", "content": f"<image_url>{ref}</image_url>?"}]):
            status, err = post(server.url + "/v1/chat/completions", {"messages": msg, "max_tokens": 2})
            assert status == 400 and err["error"]["code"] == "invalid_image", (ref, err)
            messages.add(err["error"]["message"])
        status, err = post(server.url + "/v1/tas", {"messages": image_msg(ref), "completion": "x",
                                                    "boxes": [[0, 0, 5, 5]]})
        assert status == 400, (ref, err)
        messages.add(err["error"]["message"])
    assert messages == {REFUSED}
    status, body = post(server.url + "/v1/chat/completions", {"messages": image_msg("ok.png"), "max_tokens": 2})
    assert status == 200, body


def test_local_media_off_by_default(server, media_dir, make_image):
    """The keyed server has no --allowed-local-media-path: even a file inside media_dir is refused."""
    make_image(32, 32).save(media_dir / "ok.png")
    for ref in (str(media_dir / "ok.png"), f"file://{media_dir / 'ok.png'}"):
        status, err = post(server.keyed + "/v1/chat/completions", {"messages": image_msg(ref), "max_tokens": 2},
                           key=server.key)
        assert status == 400 and err["error"]["message"] == REFUSED
    with pytest.raises(ApiError, match="--allowed-local-media-path"):
        load_image(str(media_dir / "ok.png"), MediaPolicy(), "image")


def test_image_header_over_pixel_limit_refused_before_decoding(server, make_image):
    """A header declaring 20000 x 20000 pixels is refused from the header alone (its data would not even decode:
    a decoding server would answer invalid_image, not image_too_large)."""
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(20_000, 20_000)).decode()
    status, err = post(server.url + "/v1/chat/completions", {"messages": image_msg(bomb), "max_tokens": 2})
    assert status == 400 and err["error"]["code"] == "image_too_large", err
    assert "--max-image-pixels" in err["error"]["message"]
    buf = io.BytesIO()
    make_image(400, 300).save(buf, "PNG")       # 120,000 pixels > the fixture's 100,000
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    status, err = post(server.url + "/v1/chat/completions", {"messages": image_msg(url), "max_tokens": 2})
    assert status == 400 and err["error"]["code"] == "image_too_large"
    assert "400x300" in err["error"]["message"]


def test_images_per_request_counted_before_decoding(server):
    """4 images with a limit of 3: refused as too many, though none of them would decode."""
    junk = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    parts = [{"type": "image_url", "image_url": {"url": junk}} for _ in range(4)] + [{"type": "text", "text": "?"}]
    status, err = post(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]})
    assert status == 400 and err["error"]["code"] == "too_many_images", err
    status, err = post(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": parts[1:]}]})
    assert status == 400 and err["error"]["code"] == "invalid_image"   # 3 are allowed: now they are decoded


def test_prompt_text_bounded_before_decoding_and_tokenizing(server):
    """25,000 characters with a limit of 20,000: refused before the (undecodable) image is even opened."""
    junk = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": junk}},
                                        {"type": "text", "text": "a" * 25_000}]}]
    status, err = post(server.url + "/v1/chat/completions", {"messages": msg})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    assert "--max-prompt-chars" in err["error"]["message"]


def test_confinement_follows_links_and_dotdot(tmp_path, make_image):
    """load_image directly: inside the dir (also via a link to inside) is fine; escapes are refused."""
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    make_image(20, 20).save(allowed / "in.png")
    make_image(20, 20).save(other / "out.png")
    (allowed / "inner_link.png").symlink_to(allowed / "in.png")
    (allowed / "dir_link").symlink_to(other)
    policy = MediaPolicy(allowed)
    assert load_image("in.png", policy, "p").size == (20, 20)
    assert load_image(f"file://{allowed}/inner_link.png", policy, "p").size == (20, 20)
    for ref in ("../other/out.png", "dir_link/out.png", str(other / "out.png"), "in.png\x00.txt"):
        with pytest.raises(ApiError) as exc:
            load_image(ref, policy, "p")
        assert exc.value.message == REFUSED
