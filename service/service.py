"""The BentoML services: HTTP wiring and the process layout, nothing else.

``VitClassifier`` (``vit-classifier``) is the HTTP service: its worker processes parse the
request, validate options and decode uploads (``service/pipeline.py``), then hand the pixels to
the model. Which model depends on the topology (``service/topology.py``):

- ``replicas``: each HTTP worker runs its own ``ModelRunner``;
- ``split``: ``VitModel`` (``vit-model``), a dependency run by the same ``bentoml serve`` with one
  worker process per device, owns the model; HTTP workers reach it over ZeroMQ
  (``service/transport.py``). Or, with ``VIT_MODEL_ENDPOINTS``, model processes run elsewhere
  (``bentoml serve service.service:VitModel`` with ``VIT_MODEL_BIND=tcp://...``).

Routes live on a FastAPI app mounted into the service (so ``/docs.json`` documents them beside
BentoML's ``/healthz``, ``/livez``, ``/readyz`` and ``/metrics``).
Run with ``bentoml serve service.service:VitClassifier``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import bentoml
import orjson
import torch
from bentoml import server_context
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from .answers import describe_model
from .drain import draining, install, on_header_timeout, set_gate, stop_with_parent
from .errors import ApiError
from .http import read_request
from .inference import ModelRunner, settle_heap
from .listen import balance_connections, running_config, wrap_app
from .metrics import Metrics, bound_traffic_labels, create_metrics
from .options import parse_options
from .pipeline import Backend, Pipeline
from .schemas import (
    BatchItem,
    ClassifyResponse,
    ErrorResponse,
    ModelResponse,
    classify_request,
)
from .settings import load_settings
from .topology import (
    ReadyMarks,
    claim_run_folder,
    keep_respawning,
    load_failure_reported,
    plan_for,
    report_load_failure,
)
from .transport import ModelClient, ModelServer, ipc_endpoint

__all__ = ["VitClassifier", "VitModel", "app"]

_logger = logging.getLogger(__name__)

SETTINGS = load_settings()
PLAN = plan_for(SETTINGS)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# How long a just-started HTTP worker's first requests wait for its first word from a model
# process (the model is usually up: a respawned worker connects within milliseconds).
FIRST_CONTACT_S = 5.0
# The same wait for a worker's first readiness probe, kept within a probe's timeout (2 s).
READY_CONTACT_S = 1.0
_HOT_ROUTES = {"/classify": False, "/classify_batch": True}  # path -> batch endpoint?
_CLASSIFY_ROUTES = list(_HOT_ROUTES)
_access_log = logging.getLogger("bentoml.access")

# BentoML serves the merged OpenAPI document at /docs.json; FastAPI's own doc pages stay off.
app = FastAPI(
    title="ViT Serve",
    description="Vision Transformer classification with attention over patches.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)

UI_DIR = Path(__file__).parent / "ui"
app.mount("/ui/", StaticFiles(directory=UI_DIR, html=True), name="ui")


@app.get("/ui", include_in_schema=False)
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 405, 408, 413, 415, 422, 503, 504)
}
_MODEL_ERRORS: dict[int | str, dict[str, Any]] = {503: {"model": ErrorResponse}}


class JsonResponse(Response):
    """JSON written by orjson (several times faster than the standard encoder)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _request_id(request: Request) -> str:
    return _valid_request_id(request.headers.get("x-request-id", ""))


def _valid_request_id(given: str) -> str:
    """The client's X-Request-ID when it is a safe token, else a fresh one: 128 random bits
    (unique, not secret) from ``random``, not ``os.urandom``, whose system call releases the GIL
    and then waits up to the switch interval to get it back beside a busy decode or model thread
    (~0.9 ms per request measured, ``python -m loadtests.gil_contention``)."""
    return given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"


def _error(exc: ApiError, request_id: str) -> JsonResponse:
    return JsonResponse(
        exc.body(), status_code=exc.status, headers={**exc.headers, "X-Request-ID": request_id}
    )


def _load_failed(error: str) -> bool:
    """A model could not load: end the server (``VIT_ON_LOAD_FAILURE=exit``, after the runner
    logged the error) or keep serving the error. Returns whether to keep serving."""
    if SETTINGS.on_load_failure == "exit" and server_context.worker_index is not None:
        _logger.error("stopping the server (VIT_ON_LOAD_FAILURE=exit): %s", error)
        report_load_failure(error)  # signals the arbiter: only ever from one of its workers
        return False
    return True


def _overloaded(message: str) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": "1"})


# The two refusals of admission control, built once: under overload they are most answers.
_AT_LIMIT = _overloaded(
    f"This server is at its limit of {SETTINGS.concurrency_limit} requests at once per worker; "
    "retry shortly."
)
_QUEUE_FULL = _overloaded("The model's queue is full; retry shortly.")


def _worker_index() -> int:
    """0-based index of this worker process within its service."""
    return max(0, (server_context.worker_index or 1) - 1)


def _server_runtime() -> dict[str, str]:
    """The event loop and HTTP parser this process really runs (asked, not assumed)."""
    loop = type(asyncio.get_running_loop())
    config = running_config()
    protocol = getattr(config, "http_protocol_class", None)
    return {
        "event_loop": f"{loop.__module__}.{loop.__qualname__}",
        "http_protocol": "unknown"
        if protocol is None
        else f"{protocol.__module__}.{protocol.__qualname__}",
    }


@bentoml.service(
    name="vit-model",
    workers=max(1, len(PLAN.devices)),
    traffic={"timeout": SETTINGS.request_timeout_s},
    logging={"access": {"enabled": False}},
)
class VitModel:
    """``split``: one model process per device; serves batches to the HTTP workers over ZeroMQ.

    It binds its socket only once the model is warmed up, so an HTTP worker's connection to it
    is the readiness signal; BentoML restarts it if it dies.
    """

    def __init__(self) -> None:
        index = _worker_index()
        device = PLAN.devices[index % len(PLAN.devices)]
        self.metrics = create_metrics(SETTINGS.max_batch_size)
        self.runner = ModelRunner(SETTINGS, self.metrics, device=device, threads=PLAN.torch_threads)
        endpoint = SETTINGS.model_bind or ipc_endpoint(index)
        runtime = {"pid": os.getpid(), "device": device, "torch_threads": PLAN.torch_threads}
        self.server = ModelServer(self.runner, endpoint, runtime, on_load_failure=_load_failed)
        self.server.start()

    def __is_ready__(self) -> bool:
        return self.runner.ready and not draining()

    @bentoml.api
    def status(self) -> dict[str, Any]:
        """This model process: ready, device, queue (for operators and the hop benchmark)."""
        return {
            "ready": self.runner.ready,
            "device": self.runner.device,
            "queued": self.runner.queued,
        }

    @bentoml.on_shutdown
    async def _shutdown(self) -> None:
        # The HTTP workers drain at the same time and need this process until they are done:
        # wait for them to hang up (at most the grace period). Run on its own, its HTTP workers
        # stay up: they are told to send to the other model servers, and answer when done.
        if SETTINGS.model_bind:
            self.server.leave()
        if not await self.server.idle(STOP.grace_left()):
            _logger.warning("stopping with HTTP workers still connected (grace period over)")
        self.server.stop()


@bentoml.service(
    name="vit-classifier",
    workers=PLAN.http_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    logging={"access": {"enabled": SETTINGS.access_log}},
    # OpenTelemetry's middleware wraps every request even with no exporter configured.
    tracing={"excluded_urls": [] if SETTINGS.tracing else _CLASSIFY_ROUTES},
)
@bentoml.asgi_app(app, path="/")
class VitClassifier:
    """The HTTP service; ``/readyz`` turns 200 once the model (every model process) is warm."""

    if PLAN.topology == "split" and not SETTINGS.model_endpoints:
        model_service = bentoml.depends(VitModel)

    def __init__(self) -> None:
        _SERVING[:] = [self]
        self.metrics: Metrics = create_metrics(SETTINGS.max_batch_size)
        self._client: ModelClient | None = None
        backend: Backend
        if PLAN.topology == "split":
            torch.set_num_threads(1)  # this process never runs the model
            endpoints = [e.strip() for e in SETTINGS.model_endpoints.split(",") if e.strip()]
            endpoints = endpoints or [ipc_endpoint(i) for i in range(len(PLAN.devices))]
            remote = bool(SETTINGS.model_endpoints)  # ready while any one of them serves
            self._client = backend = ModelClient(
                endpoints,
                self.metrics,
                need_all=not remote,
                queue_bound=SETTINGS.max_queue_images,
            )
            with contextlib.suppress(RuntimeError):  # BentoML builds services on its loop
                asyncio.get_running_loop()
                self._client.start()
            settle_heap()
        else:
            index = _worker_index()
            device = PLAN.devices[index % len(PLAN.devices)]
            runner = ModelRunner(SETTINGS, self.metrics, device=device, threads=PLAN.torch_threads)
            self._marks = ReadyMarks(PLAN.http_workers)
            self._index = index
            runner.start_loading(on_ready=lambda: self._marks.mark(index), on_failure=_load_failed)
            backend = runner
        self.backend = backend
        self.pipeline = Pipeline(SETTINGS, self.metrics, backend, PLAN.decode_threads)
        self._server_runtime: dict[str, str] | None = None
        self.active = 0  # classification requests admitted and not yet answered
        self._refusal_counters: dict[tuple[bool, int, str], tuple[Any, Any]] = {}

    def _connect(self) -> None:
        if self._client is not None:
            self._client.start()

    @bentoml.on_startup
    async def _listen_when_warm(self) -> None:
        """replicas: a worker restarted beside warm ones loads before it listens (uvicorn
        listens once this hook returns), so it takes no request it would answer ``not_ready``
        and readiness does not flap. At the server's start no one is warm: all listen at once
        (probes must answer) and /readyz stays 503 until every replica is warm.

        split: connect to the model processes now, not at this worker's first request."""
        self._connect()
        runner = self.backend
        if not isinstance(runner, ModelRunner) or not self._marks.others_ready(self._index):
            return
        _logger.info("a warm replica is serving: loading before listening")
        while not runner.settled:
            await asyncio.sleep(0.05)

    async def __is_ready__(self) -> bool:
        self._connect()
        if self._client is not None and not draining():
            # Just started, this worker's sockets are milliseconds from the model processes:
            # wait for them rather than answer 503 beside a worker that is already ready.
            await self._client.first_contact(READY_CONTACT_S)
        if draining() or not self.backend.ready:
            return False
        # replicas: at start, every worker must be warm, whichever one this probe reached.
        return self._client is not None or self._marks.started()

    def admit(self) -> ApiError | None:
        """Refuse cheaply, before the body is read: too many requests in this worker, or the
        model's queue already full (its bound counts images, so one image is the least)."""
        if self.active >= SETTINGS.concurrency_limit:
            return _AT_LIMIT
        if self.backend.queue_full:
            return _QUEUE_FULL
        return None

    @bentoml.on_shutdown
    async def _shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        elif isinstance(self.backend, ModelRunner):
            await self.backend.aclose()
        self.pipeline.close()

    async def _classify(self, request: Request, *, batch: bool) -> JsonResponse:
        response = await self._answer(request, batch=batch)
        self.count_request(batch, response.status_code)
        return response

    def count_request(self, batch: bool, status: int) -> None:
        """One answered request in ``vit_requests_total``."""
        endpoint = "classify_batch" if batch else "classify"
        self.metrics.requests.labels(endpoint=endpoint, status=status).inc()

    def refused(self, batch: bool, error: ApiError) -> None:
        """A request answered with ``error`` outside the handler (admission, timeout, bug)."""
        key = (batch, error.status, error.code)
        counters = self._refusal_counters.get(key)
        if counters is None:  # the labelled children, looked up once (labels() costs ~5 us)
            endpoint = "classify_batch" if batch else "classify"
            counters = self._refusal_counters[key] = (
                self.metrics.requests.labels(endpoint=endpoint, status=error.status),
                self.metrics.image_errors.labels(code=error.code),
            )
        for counter in counters:
            counter.inc()

    async def _answer(self, request: Request, *, batch: bool) -> JsonResponse:
        self._connect()
        request_id = _request_id(request)
        metrics = self.metrics
        metrics.inflight.inc()
        endpoint = "classify_batch" if batch else "classify"
        started = time.perf_counter()
        file_count = 1
        try:
            # Announced from the first byte: an idle replica's batcher waits (at most
            # VIT_MAX_WAIT_MS) for requests still being read and decoded, so they share a batch.
            if self._client is not None:
                await self._client.first_contact(FIRST_CONTACT_S)
            with self.backend.arriving(1):
                info = self.backend.info
                try:
                    async with asyncio.timeout(SETTINGS.body_timeout_s):
                        parsed = await read_request(
                            request,
                            file_field="images" if batch else "image",
                            max_files=SETTINGS.max_images_per_request if batch else 1,
                            max_body_bytes=SETTINGS.max_body_bytes,
                        )
                except TimeoutError:
                    raise ApiError(
                        408,
                        "body_timeout",
                        f"The request body did not arrive within {SETTINGS.body_timeout_s:g} s.",
                        {"Connection": "close"},
                    ) from None
                file_count = parsed.file_count
                options = parse_options(
                    parsed.fields,
                    info.num_classes,
                    default_top_k=SETTINGS.default_top_k,
                    default_attention=SETTINGS.default_attention,
                )
                prepared = await self.pipeline.prepare(parsed.uploads, options)
            results = await self.pipeline.finish(prepared, options, request_id, started)
        except ApiError as exc:
            self.pipeline.count([exc] * file_count)
            return _error(exc, request_id)
        finally:
            metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)
            metrics.inflight.dec()

        headers = {"X-Request-ID": request_id}
        if not batch:
            result = results[0]
            if isinstance(result, ApiError):
                return _error(result, request_id)
            return JsonResponse(result, headers=headers)
        items = []
        for index, (result, upload) in enumerate(zip(results, parsed.uploads, strict=True)):
            slot = (
                result.body() | {"status": result.status}
                if isinstance(result, ApiError)
                else result
            )
            items.append({"index": index, "filename": upload.filename, **slot})
        return JsonResponse(items, headers=headers)

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        summary="Classify one image (multipart field 'image'; optional top_k, attention, heatmap).",
        openapi_extra=classify_request("image", 1),
    )
    async def classify(self, request: Request) -> JsonResponse:
        return await self._classify(request, batch=False)

    @app.post(
        "/classify_batch",
        response_model=list[BatchItem],
        responses=_ERRORS,
        summary="Classify several images (field 'images' repeated); one slot per image, in order.",
        openapi_extra=classify_request("images", SETTINGS.max_images_per_request),
    )
    async def classify_batch(self, request: Request) -> JsonResponse:
        return await self._classify(request, batch=True)

    @app.get("/model", response_model=ModelResponse, responses=_MODEL_ERRORS)
    async def model(self, request: Request) -> JsonResponse:
        self._connect()
        if self._client is not None:  # a fresh HTTP worker: wait for its first answer, as
            await self._client.first_contact(FIRST_CONTACT_S)  # /classify does
        backend = self.backend
        try:
            info = backend.info
        except ApiError as exc:
            return _error(exc, _request_id(request))
        if self._server_runtime is None:
            self._server_runtime = _server_runtime()
        runtime: dict[str, Any] = {
            "topology": PLAN.topology,
            "topology_reason": PLAN.reason,
            "http_workers": PLAN.http_workers,
            "pid": os.getpid(),
            "cpus": PLAN.cpus,
            "torch_threads": PLAN.torch_threads,
            "decode_threads": PLAN.decode_threads,
            **self._server_runtime,
        }
        if self._client is not None:
            runtime["model_processes"] = list(self._client.runtime.values())
        warmup_ms = getattr(backend, "warmup_ms", 0.0)
        body = describe_model(
            info, SETTINGS, ready=backend.ready, warmup_ms=warmup_ms, runtime=runtime
        )
        return JsonResponse(body)


# --- the hot routes, past BentoML's per-request middleware -------------------------------------
_SERVING: list[VitClassifier] = []  # this worker's service instance, once BentoML made it


def hot_routes(app: Any) -> Any:
    """Serve POST /classify and /classify_batch straight from the service instance; everything
    else (the page, probes, /metrics, /model, docs) through BentoML's app as before.

    BentoML wraps every request in six middlewares (context, a timeout task, traffic metrics,
    OpenTelemetry, access log, error page); for a small model they cost more than the model:
    one replica served ~30% more requests per second without them (docs/ARCHITECTURE.md). What
    they gave these routes is kept here: the request timeout (504 JSON), a 500 JSON for an
    unexpected error, the access log line when enabled, and per-request metrics
    (``vit_requests_total{endpoint,status}`` and ``vit_request_duration_seconds``). With
    ``VIT_TRACING=true`` nothing is bypassed, so the routes are traced.

    Every other request's 404 or 405 (Starlette's plain text or ``{"detail": ...}``) is
    answered in our error shape too.
    """
    bypass = not SETTINGS.tracing

    async def serve(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        batch = _HOT_ROUTES.get(scope["path"])
        if batch is None or scope["method"] != "POST" or not _SERVING or not bypass:
            await app(scope, receive, _in_our_shape(scope, send))
            return
        started = time.perf_counter()
        service = _SERVING[0]
        request = Request(scope, receive)
        refusal = service.admit()
        if refusal is not None:  # the body stays unread (uvicorn skips it; keep-alive holds)
            response = _error(refusal, _request_id(request))
            service.refused(batch, refusal)
            await response(scope, receive, send)
            return
        service.active += 1
        try:
            async with asyncio.timeout(SETTINGS.request_timeout_s):
                response = await service._classify(request, batch=batch)
        except TimeoutError:
            message = f"Not answered within {SETTINGS.request_timeout_s} s; retry later."
            timeout = ApiError(504, "inference_timeout", message)
            response = _error(timeout, _request_id(request))
            service.refused(batch, timeout)
        except Exception:
            _logger.exception("unexpected error on %s", scope["path"])
            failure = ApiError(500, "internal_error", "Unexpected server error; see the log.")
            response = _error(failure, _request_id(request))
            service.refused(batch, failure)
        finally:
            service.active -= 1
        await response(scope, receive, send)
        if SETTINGS.access_log:
            client = scope.get("client") or ("-", 0)
            _access_log.info(
                "%s:%s (scheme=http,method=POST,path=%s) (status=%d,size=%d) %.3fms",
                client[0],
                client[1],
                scope["path"],
                response.status_code,
                len(response.body),
                (time.perf_counter() - started) * 1e3,
            )

    return serve


_GATED_PATHS = {path.encode(): batch for path, batch in _HOT_ROUTES.items()}


def _refuse_early(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The drain module's gate: a classification request this worker cannot admit is answered
    503 ``overloaded`` right after its headers, before uvicorn even starts the app (about half
    the CPU of a refusal from the hot route, which stays for anything that gets past here).
    Refusals are counted, not access-logged: under overload a line each would be a log storm."""
    if method != b"POST" or not _SERVING or SETTINGS.tracing:
        return None
    batch = _GATED_PATHS.get(url.partition(b"?")[0])
    if batch is None:
        return None
    service = _SERVING[0]
    refusal = service.admit()
    if refusal is None:
        return None
    service.refused(batch, refusal)
    given = next((value for name, value in headers if name == b"x-request-id"), b"")
    head, tail = _refusal_bytes(refusal)
    return head + _valid_request_id(given.decode("latin-1")).encode() + tail


@functools.lru_cache(maxsize=8)  # admit() returns one of two refusals, built once
def _refusal_bytes(refusal: ApiError) -> tuple[bytes, bytes]:
    """A gate refusal's answer, but for its request id: what comes before it, what after."""
    body = orjson.dumps(refusal.body())
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: %s\r\nx-request-id: "
        % (len(body), refusal.headers["Retry-After"].encode())
    )
    return head, b"\r\n\r\n" + body


def _in_our_shape(scope: Any, send: Any) -> Any:
    """``send``, with a 404 or 405 from the routing replaced by our JSON error."""
    replaced: dict[str, Any] = {}

    async def shaped(message: Any) -> None:
        if message["type"] == "http.response.start" and message["status"] in (404, 405):
            replaced["status"] = message["status"]
            replaced["allow"] = dict(message.get("headers", [])).get(b"allow", b"").decode()
            return
        if not replaced:
            await send(message)
            return
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            where, allow = f"{scope['method']} {scope['path']}", replaced["allow"]
            if replaced["status"] == 404:
                error = ApiError(404, "not_found", f"Nothing at {where}; the API is at /docs.json.")
            else:
                error = ApiError(
                    405,
                    "method_not_allowed",
                    f"{where} is not allowed" + (f"; use {allow}." if allow else "."),
                    {"Allow": allow} if allow else {},
                )
            await _error(error, _request_id(Request(scope)))({"type": "http"}, _no_receive, send)

    return shaped


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}


@functools.cache
def _known_paths() -> frozenset[str]:
    """Paths that get their own traffic-metric label: our routes and BentoML's pages."""
    return frozenset(app.openapi()["paths"]) | {
        "/", "/docs.json", "/schema.json", "/ui", "/ui/", "/healthz", "/livez", "/readyz",
        "/metrics",
    }  # fmt: skip


def _count_header_timeout() -> None:
    if _SERVING:
        metrics = _SERVING[0].metrics
        metrics.requests.labels(endpoint="(headers)", status=408).inc()
        metrics.image_errors.labels(code="header_timeout").inc()


STOP = install(
    delay_s=SETTINGS.drain_delay_s,
    grace_s=SETTINGS.grace_period_s,
    header_timeout_s=SETTINGS.header_timeout_s,
    skip_delay=load_failure_reported,
)
on_header_timeout(_count_header_timeout)
set_gate(_refuse_early)
bound_traffic_labels(_known_paths)
balance_connections()
wrap_app(hot_routes)
if server_context.worker_index is None:  # the arbiter (or a build): the workers' shared folder
    claim_run_folder()
    keep_respawning()
else:  # a worker: drain and go when the arbiter dies, never serve orphaned
    stop_with_parent()
