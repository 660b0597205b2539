"""One rule for the restricted unpicklers of untrusted files: a ValueError they raise passes as it is, any other
failure (truncated data, a bad opcode, a recursion limit) becomes a ValueError naming what was being read."""

from __future__ import annotations

import pickle


def load_restricted(unpickler: pickle.Unpickler, what: str):
    """unpickler.load(), every failure a ValueError: `what: ErrorType: message` unless it was one already."""
    try:
        return unpickler.load()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{what}: {type(e).__name__}: {e}") from None
