"""Stop strings and incremental text for streaming: pure functions on decoded text.

A completion is decoded from its ids after every step; what may be sent to a streaming client is the part
that can no longer change: before the first stop string (which is never sent), without a trailing U+FFFD (an
incomplete UTF-8 sequence that the next token may complete) and without a tail that could still grow into a
stop string. So every streamed prefix is a prefix of the final, non-streamed text.
"""

from __future__ import annotations


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string; (text, whether a stop string was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def pending_stop_tail(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def settled_text(text: str, stops: list[str]) -> str:
    """The part of a still-growing completion's text that is final (see the module docstring)."""
    text, hit = truncate_at_stop(text, stops)
    if hit:
        return text
    text = text.rstrip("\ufffd")
    return text[:len(text) - pending_stop_tail(text, stops)]
