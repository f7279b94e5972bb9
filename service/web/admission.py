"""Admission: an HTTP worker refuses a classification request cheaply, before its body is read,
when it already works on ``VIT_MAX_CONCURRENCY`` requests or the model's queue is full.

``Admission.gate`` is asked by the HTTP protocol as soon as a request's headers are parsed
(``service/runtime/server.py``): a refusal is written straight to the socket as pre-rendered
bytes, without an ASGI task, request or response object, and the body is skipped with the
connection kept. A request it lets in has its place reserved at once (marked in its scope), so
the requests whose headers come next are judged by all that is already let in, and none is
refused later, after its body was read (under a retry storm, 39 % of the refusals came that late
while places were only taken once a request reached the worker). Under overload refusals are
most answers, so everything they need (the two errors, their bytes, their counters) is made
once. Refusals are counted, not access-logged: under overload a line each would be a log storm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from ..errors import ApiError, overloaded
from ..metrics import Metrics
from .answers import refusal_bytes
from .reading import request_id

if TYPE_CHECKING:
    from ..backend import Models

__all__ = [
    "ENDPOINTS",
    "GRPC_INFER",
    "MODEL_HEADER",
    "OIP_INFER",
    "RESERVED",
    "Admission",
    "gated_endpoint",
]

# The classification routes, by path: the endpoint label their requests are counted under.
ENDPOINTS = {"/classify": "classify", "/classify_batch": "classify_batch"}
# The Open Inference Protocol's infer (``POST /v2/models/{name}[/versions/{v}]/infer``).
OIP_INFER = "oip_infer"
# The same over gRPC (``ModelInfer``).
GRPC_INFER = "oip_grpc_infer"
_GATED = {path.encode(): endpoint for path, endpoint in ENDPOINTS.items()}


def gated_endpoint(path: bytes) -> str | None:
    """The endpoint label of a classification path (no query), else None."""
    endpoint = _GATED.get(path)
    if endpoint is None and path.startswith(b"/v2/models/") and path.endswith(b"/infer"):
        return OIP_INFER
    return endpoint


# The header (beside ``?model=``) that names the model a native classification request is for.
MODEL_HEADER = "x-model"
_MODEL_HEADER = MODEL_HEADER.encode()


def model_asked(url: bytes, headers: Any) -> str | None:
    """The model a request names, from its target (``?model=``, or the protocol's
    ``/v2/models/{name}/...``) or the ``X-Model`` header; None: the default."""
    path, _, query = url.partition(b"?")
    if path.startswith(b"/v2/models/"):
        return unquote(path[len(b"/v2/models/") :].split(b"/", 1)[0].decode("latin-1"))
    if query:
        for name, value in parse_qsl(query.decode("latin-1")):
            if name == "model":
                return value
    given = next((value for name, value in headers if name == _MODEL_HEADER), None)
    return None if given is None else given.decode("latin-1")


# The scope key that says the gate let a request in and reserved its place.
RESERVED = "vit.reserved"


class Admission:
    """This worker's requests in flight, and the refusals and counts of its classification routes.

    Args:
        limit: requests this worker works on at once (``Settings.concurrency_limit``).
        models: the models, each asked whether its queue is full.
        metrics: where requests and refusals are counted.
    """

    def __init__(self, limit: int, models: Models, metrics: Metrics) -> None:
        self.limit = limit
        self.models = models
        self.metrics = metrics
        self.active = 0  # classification requests let in (places reserved), not yet answered
        self._at_limit = overloaded(
            f"This server is at its limit of {limit} requests at once per worker; retry shortly."
        )
        self._queue_full = overloaded("The model's queue is full; retry shortly.")
        self._counters: dict[tuple[str, int], Any] = {}
        self._errors: dict[str, Any] = {}

    def check(self, model: str | None = None) -> ApiError | None:
        """The refusal for a request for ``model`` (None: the default) arriving now, if any:
        too many requests in this worker, or that model's queue already full (its bound counts
        images, so one image is the least)."""
        if self.active >= self.limit:
            return self._at_limit
        if self.models.queue_full(model):
            return self._queue_full
        return None

    def admit(self, model: str | None = None) -> ApiError | None:
        """Reserve a place for a request for ``model`` arriving now (``release`` gives it
        back), or the refusal."""
        refusal = self.check(model)
        if refusal is None:
            self.active += 1
        return refusal

    def release(self) -> None:
        """A request that was let in is answered."""
        self.active -= 1

    def gate(self, method: bytes, url: bytes, scope: dict[str, Any]) -> bytes | None:
        """A classification request, right after its headers: the whole answer's bytes when
        this worker cannot admit it; else None, its place reserved (``scope[RESERVED]``)."""
        if method != b"POST":
            return None
        endpoint = gated_endpoint(url.partition(b"?")[0])
        if endpoint is None:
            return None
        refusal = self.admit(model_asked(url, scope["headers"]) if len(self.models) > 1 else None)
        if refusal is None:
            scope[RESERVED] = True
            return None
        self.refused(endpoint, refusal)
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        head, tail = refusal_bytes(refusal, oip=endpoint == OIP_INFER)
        return head + request_id(given.decode("latin-1")).encode() + tail

    def refused(self, endpoint: str, error: ApiError) -> None:
        """A request answered with ``error`` outside its handler (admission, deadline, bug):
        counted in ``vit_requests_total`` and ``vit_image_errors_total``."""
        self._requests(endpoint, error.status).inc()
        errors = self._errors.get(error.code)
        if errors is None:
            errors = self._errors[error.code] = self.metrics.image_errors.labels(code=error.code)
        errors.inc()

    def answered(self, endpoint: str, status: int) -> None:
        """One answered request in ``vit_requests_total``."""
        self._requests(endpoint, status).inc()

    def _requests(self, endpoint: str, status: int) -> Any:
        # The labelled child, looked up once (labels() costs ~5 us, more than the increment).
        counter = self._counters.get((endpoint, status))
        if counter is None:
            counter = self._counters[endpoint, status] = self.metrics.requests.labels(
                endpoint=endpoint, status=status
            )
        return counter
