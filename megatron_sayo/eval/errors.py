"""EvalError: the one user-facing error of the evaluation driver (its message says what to do)."""


class EvalError(RuntimeError):
    """A clear, user-facing evaluation failure."""
