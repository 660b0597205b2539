"""OpenAI chat-completions request parsing and validation (pure functions; no model, no HTTP).

Images arrive as content parts {"type": "image_url", "image_url": {"url": URL}} with URL a base64 data URL
(data:image/png;base64,...), a file:// URL or a local path. Extension for text-only clients (nemo-evaluator's
BYOB runner sends plain text prompts): inside a user text part, `<image_url>URL</image_url>` is an image part at
that place. Every problem raises ApiError, which the server turns into OpenAI-style error JSON.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROLES = ("system", "user", "assistant")
IMAGE_TAG = re.compile(r"<image_url>(.*?)</image_url>", re.DOTALL)
MAX_N = 16
MAX_STOP = 4


class ApiError(Exception):
    """An OpenAI-style client error: HTTP status, message, type, offending parameter, code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        """{"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """Server-side bounds: longest prompt + completion, the largest max_tokens, default max_tokens."""

    max_len: int
    max_tokens: int = 2048
    default_max_tokens: int = 256


def decode_image(url: str, param: str) -> Image.Image:
    """A data URL (base64), file:// URL or local path -> RGB PIL image; ApiError if it cannot be read."""
    if not isinstance(url, str) or not url:
        raise ApiError("image_url.url must be a non-empty string", param, "invalid_image")
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise ApiError("image data URLs must be base64 encoded (data:image/...;base64,...)", param,
                               "invalid_image")
            source = io.BytesIO(base64.b64decode(payload, validate=True))
        elif url.startswith(("http://", "https://")):
            raise ApiError("remote image URLs are not fetched by this server: send a base64 data URL or a "
                           "local path", param, "invalid_image")
        else:
            path = Path(url[len("file://"):] if url.startswith("file://") else url)
            if not path.is_file():
                raise ApiError(f"image file not found: {path}", param, "invalid_image")
            source = path
        with Image.open(source) as im:
            return im.convert("RGB")
    except ApiError:
        raise
    except (binascii.Error, ValueError) as exc:
        raise ApiError(f"image data URL is not valid base64: {exc}", param, "invalid_image") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise ApiError(f"could not decode image: {exc}", param, "invalid_image") from None


def split_image_tags(text: str, param: str) -> list[dict]:
    """A text with <image_url>URL</image_url> tags -> our content items (text and decoded images) in order."""
    items, pos = [], 0
    for m in IMAGE_TAG.finditer(text):
        if m.start() > pos:
            items.append({"type": "text", "text": text[pos:m.start()]})
        items.append({"type": "image", "image": decode_image(m.group(1).strip(), param)})
        pos = m.end()
    if pos < len(text):
        items.append({"type": "text", "text": text[pos:]})
    return items


def convert_part(part, param: str, role: str) -> list[dict]:
    """One OpenAI content part -> our content items (text / image)."""
    if not isinstance(part, dict) or "type" not in part:
        raise ApiError("each content part must be an object with a 'type'", param)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ApiError("a text part needs a string 'text'", param + ".text")
        return split_image_tags(part["text"], param) if role == "user" else [{"type": "text", "text": part["text"]}]
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        return [{"type": "image", "image": decode_image(url, param + ".image_url")}]
    raise ApiError(f"unsupported content part type {kind!r} (use 'text' or 'image_url')", param + ".type")


def convert_messages(messages) -> list[dict]:
    """OpenAI messages -> our conversation (transformers format, images decoded)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages", "missing_required_parameter"
                       if messages is None else None)
    out = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError("each message must be an object with 'role' and 'content'", param)
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ApiError(f"role must be one of {list(ROLES)}, got {role!r}", param + ".role")
        if isinstance(content, str):
            items = split_image_tags(content, param + ".content") if role == "user" else None
            out.append({"role": role, "content": items if items and any(x["type"] == "image" for x in items)
                        else content})
        elif isinstance(content, list) and content:
            items = [x for k, part in enumerate(content) for x in convert_part(part, f"{param}.content[{k}]", role)]
            out.append({"role": role, "content": items})
        else:
            raise ApiError("message content must be a string or a non-empty list of parts", param + ".content")
    if out[-1]["role"] != "user":
        raise ApiError("the last message must come from the user", f"messages[{len(out) - 1}].role")
    return out


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    """body[name] (or default) checked to be a number in [lo, hi]."""
    value = body.get(name, default)
    if value is None:
        value = default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ApiError(f"'{name}' must be {what} in [{lo}, {hi}], got {value!r}", name, "invalid_value")
    return value


def sampling_params(body: dict, limits: Limits) -> tuple:
    """(temperature, top_p, greedy, max_tokens, n, seed) from the request; temperature 0 means greedy."""
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p <= 0.0:
        raise ApiError("'top_p' must be in (0, 1]", "top_p", "invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens,
                         integer=True)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = _number(body, "seed", 0, 0, 2 ** 63 - 1, integer=True)
    return (temperature, top_p, temperature == 0.0, max_tokens, n, seed)


def stop_strings(body: dict) -> list[str]:
    """The 'stop' parameter as a list of at most MAX_STOP non-empty strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop",
                       "invalid_value")
    return stops


def encode_conversation(processor, conversation: list[dict]) -> tuple[list[int], object, object]:
    """Prompt ids (image pads expanded), pixel_values and image_grid_thw of one conversation."""
    from megatron_sayo.data.processor import conversation_images

    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    try:
        return processor.encode_prompt(text, conversation_images(conversation), where="request")
    except (ValueError, NotImplementedError) as exc:
        raise ApiError(str(exc), "messages") from None


def check_length(n_prompt: int, max_tokens: int, limits: Limits) -> None:
    """ApiError (context_length_exceeded) when prompt + max_tokens exceed the model's length."""
    if n_prompt + max_tokens > limits.max_len:
        raise ApiError(f"this model's maximum context length is {limits.max_len} tokens; the prompt has {n_prompt} "
                       f"tokens and max_tokens is {max_tokens}", "messages", "context_length_exceeded")


def parse_chat_request(body, processor, limits: Limits) -> dict:
    """A validated chat job (see engine.py) from a decoded JSON body."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if "messages" not in body:
        raise ApiError("missing required parameter: 'messages'", "messages", "missing_required_parameter")
    if body.get("stream"):
        raise ApiError("streaming is not supported by this server", "stream", "unsupported_parameter")
    params = sampling_params(body, limits)
    stops = stop_strings(body)
    conversation = convert_messages(body["messages"])
    ids, pix, grid = encode_conversation(processor, conversation)
    check_length(len(ids), params[3], limits)
    return {"kind": "chat", "ids": ids, "pixel_values": pix, "image_grid_thw": grid, "params": params,
            "stop": stops}


def parse_tas_request(body, processor, limits: Limits, image_token_id: int, merge_size: int,
                      patch_size: int) -> dict:
    """A TAS job: {"messages" (one image), "completion": str, "boxes": [[x1,y1,x2,y2],...], "temperature"?}."""
    from megatron_sayo.data.processor import conversation_images
    from megatron_sayo.data.regions import RegionError, RegionSpec, batch_region_mask

    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    for name in ("messages", "completion", "boxes"):
        if name not in body:
            raise ApiError(f"missing required parameter: {name!r}", name, "missing_required_parameter")
    if not isinstance(body["completion"], str) or not body["completion"]:
        raise ApiError("'completion' must be a non-empty string", "completion", "invalid_value")
    boxes = body["boxes"]
    if (not isinstance(boxes, list) or not boxes or not all(isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in b) for b in boxes)):
        raise ApiError("'boxes' must be a non-empty list of [x1, y1, x2, y2]", "boxes", "invalid_value")
    temperature = float(_number(body, "temperature", 1.0, 1e-3, 10.0))
    conversation = convert_messages(body["messages"])
    images = conversation_images(conversation)
    if len(images) != 1:
        raise ApiError(f"TAS needs exactly one image in the messages, got {len(images)}", "messages")
    ids, pix, grid = encode_conversation(processor, conversation)
    completion = processor.tokenizer.encode(body["completion"])
    if not completion:
        raise ApiError("'completion' encodes to no tokens", "completion", "invalid_value")
    check_length(len(ids), len(completion), limits)
    try:
        region = batch_region_mask(__import__("torch").tensor([ids]), grid, image_token_id,
                                   [RegionSpec(boxes=boxes, orig_size=images[0].size)], merge_size, patch_size)[0]
    except (RegionError, ValueError) as exc:
        raise ApiError(f"bad boxes: {exc}", "boxes", "invalid_value") from None
    return {"kind": "tas", "ids": ids, "completion_ids": completion, "pixel_values": pix, "image_grid_thw": grid,
            "region_mask": region, "temperature": temperature}
