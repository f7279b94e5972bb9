"""The one error type of the request path: an HTTP status, a machine-readable code, a message.

Every refusal a client can get (a bad upload, a bad option, a full queue, a model that is not
ready) is an ``ApiError``, raised where the problem is found and turned into the JSON error body
``{"error": {"code", "message"}}`` by the HTTP layer, or into a per-image slot of a batch answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ApiError"]


class ApiError(Exception):
    """A request-level (or per-image) error with its HTTP status and machine-readable code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"ApiError(status={self.status}, code={self.code!r}, message={self.message!r})"
