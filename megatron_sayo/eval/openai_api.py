"""OpenAI chat-completions request parsing and validation (pure functions; no model, no HTTP).

Images arrive as content parts {"type": "image_url", "image_url": {"url": URL}} with URL a base64 data URL or,
when the server allows local media, a file:// URL or local path (media.py decides). Extension for text-only
clients (nemo-evaluator's BYOB runner sends plain text prompts): inside a user text part,
`<image_url>URL</image_url>` is an image part at that place, under the same media policy. Role `developer`
is a system message (as OpenAI's newer models name it). Every problem raises ApiError, which the server turns
into OpenAI-style error JSON.

The cheap checks come first: parameters, message structure, the number of images and the amount of text are
all checked before any image is decoded or any text tokenized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_sayo.eval.errors import ApiError
from megatron_sayo.eval.media import MediaPolicy, load_image
from megatron_sayo.eval.serve_config import SERVE_DEFAULTS

__all__ = ["ApiError", "Limits", "parse_chat_request", "parse_tas_request"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
IMAGE_TAG = re.compile(r"<image_url>(.*?)</image_url>", re.DOTALL)
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format")


@dataclass(frozen=True)
class Limits:
    """Server-side bounds of one request (defaults: serve_config.SERVE_DEFAULTS)."""

    max_len: int                                    # prompt + completion tokens
    max_tokens: int = SERVE_DEFAULTS.max_tokens_limit
    default_max_tokens: int = SERVE_DEFAULTS.default_max_tokens
    max_images: int = SERVE_DEFAULTS.max_images_per_request
    max_prompt_chars: int = SERVE_DEFAULTS.max_prompt_chars
    max_n: int = SERVE_DEFAULTS.max_n
    max_stop: int = SERVE_DEFAULTS.max_stop
    max_top_logprobs: int = SERVE_DEFAULTS.max_top_logprobs
    media: MediaPolicy = MediaPolicy()


# ------------------------------------------------------------------------------------------------ messages

def _parts(content, role: str, param: str) -> list[tuple[str, str, str]]:
    """A message's content as (kind, value, param) with kind 'text' or 'image' (URL not opened yet)."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    elif not isinstance(content, list) or not content:
        raise ApiError("message content must be a string or a non-empty list of parts", param)
    out = []
    for k, part in enumerate(content):
        where = f"{param}[{k}]" if param.endswith("content") else param
        if not isinstance(part, dict) or "type" not in part:
            raise ApiError("each content part must be an object with a 'type'", where)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError("a text part needs a string 'text'", where + ".text")
            out += _split_tags(part["text"], where) if role == "user" else [("text", part["text"], where)]
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise ApiError("image_url.url must be a non-empty string", where + ".image_url", "invalid_image")
            out.append(("image", url, where + ".image_url"))
        else:
            raise ApiError(f"unsupported content part type {kind!r} (use 'text' or 'image_url')", where + ".type")
    return out


def _split_tags(text: str, param: str) -> list[tuple[str, str, str]]:
    """A user text with <image_url>URL</image_url> tags -> text and image items in order."""
    items, pos = [], 0
    for m in IMAGE_TAG.finditer(text):
        if m.start() > pos:
            items.append(("text", text[pos:m.start()], param))
        items.append(("image", m.group(1).strip(), param))
        pos = m.end()
    if pos < len(text):
        items.append(("text", text[pos:], param))
    return items


def scan_messages(messages, limits: Limits) -> list[tuple[str, list]]:
    """Structure checked, images counted and text measured, nothing opened: [(role, items)]."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages",
                       "missing_required_parameter" if messages is None else None)
    scanned, images, chars = [], 0, 0
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError("each message must be an object with 'role' and 'content'", param)
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(f"role must be one of {list(ROLES)}, got {role!r}", param + ".role")
        items = _parts(msg.get("content"), ROLES[role], param + ".content")
        images += sum(kind == "image" for kind, _, _ in items)
        chars += sum(len(value) for kind, value, _ in items if kind == "text")
        if images > limits.max_images:
            raise ApiError(f"more than {limits.max_images} images in one request (--max-images-per-request)",
                           "messages", "too_many_images")
        if chars > limits.max_prompt_chars:
            raise ApiError(f"the messages hold more than {limits.max_prompt_chars} characters of text "
                           f"(--max-prompt-chars)", "messages", "context_length_exceeded")
        scanned.append((ROLES[role], items))
    if scanned[-1][0] != "user":
        raise ApiError("the last message must come from the user", f"messages[{len(scanned) - 1}].role")
    return scanned


def convert_messages(messages, limits: Limits) -> list[dict]:
    """OpenAI messages -> our conversation (transformers format, images opened under the media policy)."""
    out = []
    for role, items in scan_messages(messages, limits):
        if all(kind == "text" for kind, _, _ in items):
            out.append({"role": role, "content": "".join(value for _, value, _ in items)})
            continue
        out.append({"role": role, "content": [
            {"type": "text", "text": value} if kind == "text" else
            {"type": "image", "image": load_image(value, limits.media, param)} for kind, value, param in items]})
    return out


# ------------------------------------------------------------------------------------------------ parameters

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
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    seed = _number(body, "seed", 0, 0, 2 ** 63 - 1, integer=True)
    return (temperature, top_p, temperature == 0.0, max_tokens, n, seed)


def stop_strings(body: dict, limits: Limits) -> list[str]:
    """The 'stop' parameter as a list of at most max_stop non-empty strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > limits.max_stop or not all(isinstance(s, str) and s
                                                                               for s in stops):
        raise ApiError(f"'stop' must be a non-empty string or a list of at most {limits.max_stop} of them", "stop",
                       "invalid_value")
    return stops


def logprobs_param(body: dict, limits: Limits) -> int | None:
    """None when log-probs are not asked for, else how many top alternatives per token (0..max_top_logprobs)."""
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError("'logprobs' must be a boolean", "logprobs", "invalid_value")
    top = body.get("top_logprobs")
    if top is not None:
        top = _number(body, "top_logprobs", 0, 0, limits.max_top_logprobs, integer=True)
        if not want:
            raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return (top or 0) if want else None


def stream_params(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) from 'stream' and 'stream_options'."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean", "stream", "invalid_value")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError("'stream_options' is only allowed with 'stream': true", "stream_options", "invalid_value")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError("'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                       "invalid_value")
    return stream, bool(options.get("include_usage", False))


def refuse_unsupported(body: dict) -> None:
    """400 naming the parameter for features this server does not implement (rather than ignoring them)."""
    for name in UNSUPPORTED:
        value = body.get(name)
        if value is None or value == [] or (name == "response_format" and value == {"type": "text"}):
            continue
        raise ApiError(f"'{name}' is not supported by this server (no tool calling or structured output)", name,
                       "unsupported_parameter")


# ------------------------------------------------------------------------------------------------ requests

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


def check_body(body) -> None:
    """A JSON object with 'messages'."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if "messages" not in body:
        raise ApiError("missing required parameter: 'messages'", "messages", "missing_required_parameter")


def parse_chat_request(body, processor, limits: Limits) -> dict:
    """A validated chat job (see engine.py) from a decoded JSON body."""
    check_body(body)
    refuse_unsupported(body)
    params = sampling_params(body, limits)
    stops = stop_strings(body, limits)
    top_logprobs = logprobs_param(body, limits)
    stream, include_usage = stream_params(body)
    conversation = convert_messages(body["messages"], limits)
    ids, pix, grid = encode_conversation(processor, conversation)
    check_length(len(ids), params[3], limits)
    return {"kind": "chat", "ids": ids, "pixel_values": pix, "image_grid_thw": grid, "params": params,
            "stop": stops, "logprobs": top_logprobs, "stream": stream, "include_usage": include_usage}


def parse_tas_request(body, processor, limits: Limits, tokens, merge_size: int, patch_size: int) -> dict:
    """A TAS job: {"messages" (one image), "completion": str, "boxes": [[x1,y1,x2,y2],...], "temperature"?}.
    `tokens` are the checkpoint's special ids (TokenIds): a completion may hold none of the vision ones."""
    from megatron_sayo.data.processor import conversation_images
    from megatron_sayo.data.regions import RegionError, RegionSpec, batch_region_mask

    check_body(body)
    for name in ("completion", "boxes"):
        if name not in body:
            raise ApiError(f"missing required parameter: {name!r}", name, "missing_required_parameter")
    if not isinstance(body["completion"], str) or not body["completion"]:
        raise ApiError("'completion' must be a non-empty string", "completion", "invalid_value")
    if len(body["completion"]) > limits.max_prompt_chars:
        raise ApiError(f"'completion' is longer than {limits.max_prompt_chars} characters", "completion",
                       "context_length_exceeded")
    boxes = body["boxes"]
    if (not isinstance(boxes, list) or not boxes or not all(isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in b) for b in boxes)):
        raise ApiError("'boxes' must be a non-empty list of [x1, y1, x2, y2]", "boxes", "invalid_value")
    temperature = float(_number(body, "temperature", 1.0, 1e-3, 10.0))
    conversation = convert_messages(body["messages"], limits)
    images = conversation_images(conversation)
    if len(images) != 1:
        raise ApiError(f"TAS needs exactly one image in the messages, got {len(images)}", "messages")
    ids, pix, grid = encode_conversation(processor, conversation)
    completion = processor.tokenizer.encode(body["completion"])
    if not completion:
        raise ApiError("'completion' encodes to no tokens", "completion", "invalid_value")
    vision = sorted({processor.tokenizer.decode([i]) for i in completion if i in tokens.vision})
    if vision:
        raise ApiError(f"'completion' holds {', '.join(vision)}: vision tokens are never generated and have no "
                       "pixels to score them with", "completion", "invalid_value")
    check_length(len(ids), len(completion), limits)
    try:
        region = batch_region_mask(__import__("torch").tensor([ids]), grid, tokens.image,
                                   [RegionSpec(boxes=boxes, orig_size=images[0].size)], merge_size, patch_size)[0]
    except (RegionError, ValueError) as exc:
        raise ApiError(f"bad boxes: {exc}", "boxes", "invalid_value") from None
    return {"kind": "tas", "ids": ids, "completion_ids": completion, "pixel_values": pix, "image_grid_thw": grid,
            "region_mask": region, "temperature": temperature}
