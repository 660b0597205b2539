"""OpenAI chat-completion response objects built from engine results (pure functions).

Non-streaming: one `chat.completion`. Streaming: `chat.completion.chunk` objects sent as server-sent events:
the role first, then text deltas as they settle, then per choice the rest of its text with its finish_reason
(and its log-probs, when asked for, in that last chunk), then with stream_options.include_usage a chunk with
no choices and the usage, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: dict) -> dict:
    """Prompt and completion tokens of an engine result (completion tokens: those generated, stop included)."""
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def logprobs_object(choice: dict) -> dict | None:
    """`choices[i].logprobs`: {"content": [...]} when log-probs were asked for, else None."""
    return {"content": choice["logprobs"]} if "logprobs" in choice else None


def chat_completion(result: dict, model: str, rid: str | None = None) -> dict:
    """The `chat.completion` object for an engine result."""
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"], "logprobs": logprobs_object(c)} for c in result["choices"]]
    return {"id": rid or new_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(result)}


def chunk(rid: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """One `chat.completion.chunk`."""
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def delta_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}


def final_choices(result: dict, sent: dict[int, str]) -> list[dict]:
    """Per choice: the text not yet streamed, its finish_reason and log-probs."""
    return [delta_choice(c["index"], {"content": c["text"][len(sent.get(c["index"], "")):]}, c["finish_reason"],
                         logprobs_object(c)) for c in result["choices"]]


def sse(obj) -> str:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
