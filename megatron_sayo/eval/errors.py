"""The evaluation package's two errors: EvalError for the driver's user, ApiError for the server's clients."""

from __future__ import annotations


class EvalError(RuntimeError):
    """A clear, user-facing evaluation failure."""


class ApiError(Exception):
    """An OpenAI-style client error: HTTP status, message, type, offending parameter, code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        """{"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
