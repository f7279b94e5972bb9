"""The model repository API, in Triton's shape (``--model-control-mode=explicit``), for
operators: what is served, and a new version of the model put in service without a restart.

    POST /v2/repository/index                        [{"name", "version", "state", "reason",
                                                       "traffic_percent"}]
    POST /v2/repository/models/{name}/load           {"parameters": {"source": "<VIT_MODEL>"}}
                                                     (+ "canary_percent": 1-99: beside, a share)
    POST /v2/repository/models/{name}/traffic        {"parameters": {"canary_percent": 0-100}}
    POST /v2/repository/models/{name}/unload         409: the one model cannot be unloaded

Off unless ``VIT_ADMIN_TOKEN`` is set (403 ``admin_disabled``); then every call needs
``Authorization: Bearer <token>`` (401 ``unauthorized`` without one, 403 ``forbidden`` with
another; compared in constant time). A load may reach any HTTP worker: the backend puts the
version in service in every process that serves the model and answers once all have switched
(``service/runtime/swaps.py``). Errors are the protocol's (``{"error": "<code>: <message>"}``).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import orjson
from fastapi.responses import Response
from starlette.requests import Request

from ..errors import ApiError
from ..runtime.settings import Settings

if TYPE_CHECKING:
    from .worker import HttpWorker

__all__ = ["PREFIX", "Admin"]

PREFIX = "/v2/repository"
_MODELS = f"{PREFIX}/models/"
_ACTIONS = ("load", "traffic", "unload")
_BODY_LIMIT = 64 * 1024  # a load's body is a source string: a few hundred bytes


class Admin:
    """The repository API of one HTTP worker.

    Args:
        settings: the admin token (and the rest).
    """

    def __init__(self, settings: Settings) -> None:
        self._token = settings.admin_token.encode()

    async def serve(self, request: Request, worker: HttpWorker) -> Response:
        """A call under ``/v2/repository`` (raises ApiError, in the caller's shape)."""
        self.authorize(request.headers.get("authorization"))
        path, method = request.scope["path"], request.method
        if method != "POST":
            raise ApiError(405, "method_not_allowed", f"Use POST here, not {method}.",
                           {"Allow": "POST"})  # fmt: skip
        if path == f"{PREFIX}/index":
            await worker.models.first_contact()
            return _json(_index(worker))
        name, _, action = path.removeprefix(_MODELS).rpartition("/")
        if not path.startswith(_MODELS) or action not in _ACTIONS or not name:
            raise ApiError(404, "not_found", f"Nothing at {method} {path}.")
        backend = worker.models.get(name)
        info = backend.info
        if action == "unload":
            raise ApiError(
                409,
                "cannot_unload",
                f"'{name}' is served from the start (VIT_MODEL, VIT_MODELS): unloading it "
                "would leave its requests nothing to answer them. Load another version instead.",
            )
        parameters = _parameters(await _body(request))
        if action == "traffic":
            percent = _percent(parameters, 0, 100)
            if percent is None:
                raise ApiError(400, "invalid_parameters", "Send 'canary_percent': 0 to 100.")
            return _json(await backend.set_traffic(percent))
        source = _source(parameters) or info.source
        return _json(await backend.load_version(source, _percent(parameters, 1, 99) or 100))

    def authorize(self, header: str | None) -> None:
        """Let the call through, or raise 403 (off, or another token) or 401 (none given)."""
        if not self._token:
            raise ApiError(
                403,
                "admin_disabled",
                "The repository API is off: start the server with VIT_ADMIN_TOKEN set.",
            )
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "unauthorized",
                "Send the admin token as 'Authorization: Bearer <token>'.",
                {"WWW-Authenticate": 'Bearer realm="vit-serve"'},
            )
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(403, "forbidden", "That admin token is not this server's.")


def _index(worker: HttpWorker) -> list[dict[str, Any]]:
    """Each version of each model serving, in Triton's shape, with its share of the traffic."""
    rows: list[dict[str, Any]] = []
    for model in worker.models.listing():
        if model["state"] == "ready":
            state = {"state": "READY", "reason": ""}
        else:
            state = {"state": "UNAVAILABLE", "reason": model.get("reason") or "loading"}
        rows += [
            {"name": row["name"], "version": row["version"], **state,
             "traffic_percent": row["traffic_percent"]}
            for row in model["versions"]
        ]  # fmt: skip
        if not model["versions"] and model["name"]:
            rows.append({"name": model["name"], **state})
    return rows


async def _body(request: Request) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _BODY_LIMIT:
            raise ApiError(413, "body_too_large", f"A load's body is at most {_BODY_LIMIT} bytes.")
    return body


def _parameters(body: bytes) -> dict[str, Any]:
    """A call's ``parameters`` (none: {}); 400 if the body is not the protocol's."""
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "The body is not JSON.") from None
    parameters = data.get("parameters", {}) if isinstance(data, dict) else None
    if not isinstance(parameters, dict):
        raise ApiError(
            400, "invalid_parameters", 'Send {"parameters": {"source": "<model source>"}}.'
        )
    return parameters


def _percent(parameters: dict[str, Any], low: int, high: int) -> int | None:
    """The ``canary_percent`` parameter, if given (400 outside ``low``..``high``)."""
    value = parameters.get("canary_percent")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(
            400, "invalid_parameters", f"'canary_percent' must be an integer {low} to {high}."
        )
    return value


def _source(parameters: dict[str, Any]) -> str | None:
    """The ``source`` parameter (None: load what is served again)."""
    source = parameters.get("source")
    if source is None:
        return None
    if not isinstance(source, str) or not source.strip():
        raise ApiError(400, "invalid_source", "'source' must be a model source string.")
    return source.strip()


def _json(content: Any) -> Response:
    return Response(orjson.dumps(content), 200, media_type="application/json")
