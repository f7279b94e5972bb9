"""The one error type of the request path: an HTTP status, a machine-readable code, a message.

Every refusal a client can get (a bad upload, a bad option, a full queue, a model that is not
ready) is an ``ApiError``, raised where the problem is found and turned into the JSON error body
``{"error": {"code", "message"}}`` by the HTTP layer, or into a per-image slot of a batch answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ApiError", "body_timeout", "load_failed", "not_ready", "overloaded"]


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


def not_ready(message: str = "The model is still loading; retry shortly.") -> ApiError:
    """The 503 every path answers while no model can take the request."""
    return ApiError(503, "not_ready", message, {"Retry-After": "5"})


def load_failed(error: str) -> ApiError:
    """The 503 every path answers once the model failed to load (``VIT_ON_LOAD_FAILURE=serve``).

    No ``Retry-After``: nothing retries the load, so retrying the request cannot help.
    """
    return ApiError(
        503,
        "load_failed",
        f"The model failed to load: {error} Fix VIT_MODEL or the checkpoint and restart the "
        "server; the server log has the details.",
    )


def overloaded(message: str, retry_after_s: int = 1) -> ApiError:
    """The 503 of a full queue or a worker at its limit: retry after ``retry_after_s``."""
    return ApiError(503, "overloaded", message, {"Retry-After": str(retry_after_s)})


def body_timeout(seconds: float) -> ApiError:
    """The 408 of a request body that did not arrive within ``seconds``; the connection closes."""
    return ApiError(
        408,
        "body_timeout",
        f"The request body did not arrive within {seconds:g} s.",
        {"Connection": "close"},
    )
