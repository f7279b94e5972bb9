"""The native HTTP API, the worker's front door: ``POST /classify``, ``POST /classify_batch``,
``GET /model`` and the page at ``/ui``.

``Front`` is what the server integration (``service/runtime/server.py``) asks of the HTTP side:
the app each worker serves (``wrap``), the admission gate, the header deadline's answer, and the
paths that get their own traffic label. The routes live on a FastAPI app mounted into the
BentoML service, so ``/docs.json`` documents them beside BentoML's ``/healthz``, ``/livez``,
``/readyz`` and ``/metrics``.

The classification routes are served straight from the worker, past BentoML's per-request
middleware (context, a timeout task, traffic metrics, OpenTelemetry, access log, error page):
for a small model they cost more than the model, one replica served ~30% more requests per
second without them (docs/ARCHITECTURE.md). What they gave these routes the worker keeps
(``HttpWorker.admitted``): the request timeout (504 JSON), a 500 JSON for an unexpected error,
per-request metrics; the access log line is written here. With ``VIT_TRACING=true`` the routes
go through BentoML's app like the rest, so they are traced; either way they reach the worker by
``Front.classify``. Every other request's 404 or 405 is answered in our error shape too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from ..errors import ApiError, body_timeout
from ..model.loading import ModelInfo
from ..runtime.server import listening_host
from ..runtime.settings import Settings
from .admission import ENDPOINTS, MODEL_HEADER, RESERVED
from .answers import AnswerBuilder, JsonResponse, error_response, header_timeout_bytes
from .oip import Oip, oip_route
from .oip_grpc import GrpcDoor
from .options import parse_options
from .pipeline import CLIENT_KEY
from .reading import read_request, request_id
from .schemas import (
    BatchItem,
    ClassifyResponse,
    ErrorResponse,
    ModelResponse,
    ModelsResponse,
    OipError,
    OipInferResponse,
    OipLive,
    OipModelMetadata,
    OipModelReady,
    OipReady,
    OipServerMetadata,
    classify_request,
    oip_infer_request,
)
from .worker import HttpWorker

__all__ = ["UI_DIR", "Front"]

_access_log = logging.getLogger("bentoml.access")

UI_DIR = Path(__file__).parent / "ui"
# BentoML's own pages: they get their own traffic label too.
_BENTO_PATHS = ("/", "/docs.json", "/schema.json", "/healthz", "/livez", "/readyz", "/metrics")
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 405, 408, 413, 415, 422, 503, 504)
}


class Front:
    """This process's HTTP front door; the worker is attached once BentoML has built it (the
    model process has none: everything passes through to BentoML's app).

    Args:
        settings: the service's settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker: HttpWorker | None = None
        self.oip = Oip(settings)
        self.grpc = GrpcDoor(settings)
        self.app = _native_api(self, settings)
        self._answers: dict[str, AnswerBuilder] = {}  # by model name
        self._known: frozenset[str] | None = None

    def attach(self, worker: HttpWorker) -> None:
        """Serve the classification routes (and the Open Inference Protocol) from ``worker``."""
        self.worker = worker
        self.oip.attach(worker)

    async def open_doors(self) -> None:
        """Once the worker started: the other front doors (gRPC), where its HTTP socket
        listens (none outside a served worker, as in-process tests run)."""
        host = listening_host()
        if host is not None and self.worker is not None:
            await self.grpc.open(self.worker, host)

    # --- what the server integration asks ------------------------------------------------
    async def close_doors(self, grace_s: float) -> None:
        """The stop (``WorkerServer.shutdown``): gRPC refuses new calls and answers those in
        flight within ``grace_s``, beside the HTTP drain."""
        await self.grpc.close(grace_s)

    def wrap(self, app: Any) -> Any:
        """The ASGI app a worker serves: the classification routes straight from the worker,
        everything else through BentoML's ``app`` with 404 and 405 in our shape."""
        bypass = not self.settings.tracing
        access_log = self.settings.access_log

        async def serve(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope["path"]
            endpoint = ENDPOINTS.get(path)
            oip = path == "/v2" or path.startswith("/v2/")
            if (
                not bypass
                or self.worker is None
                or not (oip or (endpoint is not None and scope["method"] == "POST"))
            ):
                await app(scope, receive, _in_our_shape(scope, send))
                return
            started = time.perf_counter()
            request = Request(scope, receive)
            if oip:
                response = await self.oip.serve(request)
            else:
                assert endpoint is not None
                response = await self.classify(request, endpoint)
            await response(scope, receive, send)
            if access_log:
                client = scope.get("client") or ("-", 0)
                _access_log.info(
                    "%s:%s (scheme=http,method=%s,path=%s) (status=%d,size=%d) %.3fms",
                    client[0],
                    client[1],
                    scope["method"],
                    path,
                    response.status_code,
                    len(response.body),
                    (time.perf_counter() - started) * 1e3,
                )

        return serve

    def gate(self, method: bytes, url: bytes, scope: dict[str, Any]) -> bytes | None:
        """The admission gate, asked right after a request's headers (off while tracing: a
        refusal would go untraced)."""
        if self.worker is None or self.settings.tracing:
            return None
        return self.worker.admission.gate(method, url, scope)

    def header_timeout(self, seconds: float) -> bytes:
        """A connection's headers came too late: count it; the 408's bytes."""
        if self.worker is not None:
            error = ApiError(408, "header_timeout", "The request headers came too late.")
            self.worker.admission.refused("(headers)", error)
        return header_timeout_bytes(seconds)

    def path_label(self, path: str) -> str | None:
        """The traffic-metric label of ``path``: our routes and BentoML's pages are their own,
        a protocol route (``/v2/...``) its template; None for anything else."""
        if self._known is None:
            self._known = frozenset(self.app.openapi()["paths"]) | {"/ui", "/ui/", *_BENTO_PATHS}
        if path in self._known:
            return path
        return oip_route(path)

    # --- the classification routes -------------------------------------------------------
    async def classify(self, request: Request, endpoint: str) -> Response:
        """A classification request, refused at once or answered through the worker."""
        worker = self.worker
        assert worker is not None, "no HTTP worker in this process"
        rid = request_id(request.headers.get("x-request-id", ""))
        if not request.scope.pop(RESERVED, False):  # the gate was not asked (a pipelined one)
            refusal = worker.admission.admit(asked_model(request))
            if refusal is not None:  # the body stays unread (uvicorn skips it)
                worker.admission.refused(endpoint, refusal)
                return error_response(refusal, rid)
        async with worker.admitted(endpoint, rid) as envelope:
            envelope.response = await self._classify(worker, request, endpoint, rid)
        assert envelope.response is not None
        return envelope.response

    async def _classify(
        self, worker: HttpWorker, request: Request, endpoint: str, rid: str
    ) -> Response:
        settings = worker.settings
        batch = endpoint == "classify_batch"
        started = time.perf_counter()
        file_count = 1
        try:
            # Announced from the first byte: an idle replica's batcher waits (at most
            # VIT_MAX_WAIT_MS) for requests still being read and decoded, so they share a batch.
            with contextlib.ExitStack() as announced:
                backend = worker.models.get(asked_model(request))
                announced.enter_context(backend.arriving(1))
                info = backend.info
                try:
                    async with asyncio.timeout(settings.body_timeout_s):
                        parsed = await read_request(
                            request,
                            file_field="images" if batch else "image",
                            max_files=settings.max_images_per_request if batch else 1,
                            max_body_bytes=settings.max_body_bytes,
                        )
                except TimeoutError:
                    raise body_timeout(settings.body_timeout_s) from None
                file_count = parsed.file_count
                options = parse_options(
                    parsed.fields,
                    info.num_classes,
                    default_top_k=settings.default_top_k,
                    default_attention=settings.default_attention,
                )
                scored = await worker.pipeline.run(
                    backend, parsed.uploads, options, announced, request.headers.get(CLIENT_KEY)
                )
        except ApiError as exc:
            worker.pipeline.count([exc] * file_count)
            return error_response(exc, rid)
        filenames = [upload.filename for upload in parsed.uploads] if batch else None
        return self._answers_for(worker, info).respond(
            scored, options, request_id=rid, started=started, filenames=filenames
        )

    def _answers_for(self, worker: HttpWorker, info: ModelInfo) -> AnswerBuilder:
        """The answer builder for the model ``info`` (rebuilt when its version changed)."""
        answers = self._answers.get(info.name)
        if answers is None or answers.info is not info:
            answers = self._answers[info.name] = AnswerBuilder(info, worker.metrics)
        return answers

    async def model(self, request: Request) -> Response:
        """``GET /model`` (``?model=NAME``: that one; default: the default model)."""
        assert self.worker is not None, "no HTTP worker in this process"
        try:
            return JsonResponse(await self.worker.describe(asked_model(request)))
        except ApiError as exc:
            return error_response(exc, request_id(request.headers.get("x-request-id", "")))

    async def models(self, request: Request) -> Response:
        """``GET /models``: every model served, the default first, its versions and state."""
        assert self.worker is not None, "no HTTP worker in this process"
        return JsonResponse({"models": self.worker.models.listing()})


def asked_model(request: Request) -> str | None:
    """The model a native request names: ``?model=NAME``, else the ``X-Model`` header; None:
    the default."""
    return request.query_params.get("model") or request.headers.get(MODEL_HEADER) or None


def _native_api(front: Front, settings: Settings) -> FastAPI:
    """The routes (BentoML serves the merged OpenAPI document at /docs.json; FastAPI's own
    doc pages stay off)."""
    app = FastAPI(
        title="ViT Serve",
        description="Vision Transformer classification with attention over patches.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.mount("/ui/", StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        summary="Classify one image (multipart field 'image'; optional top_k, attention, heatmap).",
        openapi_extra=classify_request("image", 1),
    )
    async def classify(request: Request) -> Response:
        return await front.classify(request, "classify")

    @app.post(
        "/classify_batch",
        response_model=list[BatchItem],
        responses=_ERRORS,
        summary="Classify several images (field 'images' repeated); one slot per image, in order.",
        openapi_extra=classify_request("images", settings.max_images_per_request),
    )
    async def classify_batch(request: Request) -> Response:
        return await front.classify(request, "classify_batch")

    _protocol_routes(app, front, settings)

    @app.api_route(
        "/v2{rest:path}",
        methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        include_in_schema=False,
    )
    async def open_inference_protocol(request: Request, rest: str) -> Response:
        # Reached with VIT_TRACING=true (else Front.wrap serves /v2 before BentoML's app).
        return await front.oip.serve(request)

    @app.get(
        "/model",
        response_model=ModelResponse,
        responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
        summary="One model's metadata (?model=NAME; default: the default model).",
    )
    async def model(request: Request) -> Response:
        return await front.model(request)

    @app.get(
        "/models",
        response_model=ModelsResponse,
        summary="The models served (VIT_MODELS), the default first: versions, traffic, state.",
    )
    async def models(request: Request) -> Response:
        return await front.models(request)

    return app


def _protocol_routes(app: FastAPI, front: Front, settings: Settings) -> None:
    """The Open Inference Protocol's routes, for ``/docs.json`` and for the traced app: without
    tracing, ``Front.wrap`` serves ``/v2`` before BentoML's app is reached."""

    async def server(request: Request) -> Response:
        return await front.oip.serve(request)

    async def model(request: Request, model_name: str) -> Response:
        return await front.oip.serve(request)

    async def version(request: Request, model_name: str, model_version: str) -> Response:
        return await front.oip.serve(request)

    Responses = dict[int | str, dict[str, Any]]
    errors: Responses = {404: {"model": OipError}, 405: {"model": OipError}}
    infer_errors: Responses = {
        status: {"model": OipError} for status in (400, 404, 405, 408, 413, 415, 422, 503, 504)
    }
    infer_errors[200] = {
        "description": "JSON, or with binary outputs the JSON followed by the tensors' bytes "
        "(Inference-Header-Content-Length: the JSON's length).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    infer_request = oip_infer_request(settings.max_images_per_request)
    # (path, handler, method, answer, other answers, summary)
    routes: list[tuple[str, Any, str, type, Responses, str]] = [
        ("/v2", server, "GET", OipServerMetadata, errors, "server metadata"),
        ("/v2/health/live", server, "GET", OipLive, errors, "live"),
        ("/v2/health/ready", server, "GET", OipReady, {**errors, 400: {"model": OipReady}},
         "ready (400 if not)"),
    ]  # fmt: skip
    for prefix, handler in (
        ("/v2/models/{model_name}", model),
        ("/v2/models/{model_name}/versions/{model_version}", version),
    ):
        routes += [
            (prefix, handler, "GET", OipModelMetadata, {**errors, 503: {"model": OipError}},
             "the model's tensors and parameters"),
            (f"{prefix}/ready", handler, "GET", OipModelReady,
             {**errors, 400: {"model": OipModelReady}}, "the model is ready (400 if not)"),
            (f"{prefix}/infer", handler, "POST", OipInferResponse, infer_errors,
             "classify images (tensor 'image' or 'pixels'): probabilities, attention, crop "
             "boxes, heatmaps"),
        ]  # fmt: skip
    for path, handler, method, answer, responses, summary in routes:
        app.add_api_route(
            path,
            handler,
            methods=[method],
            response_model=answer,
            responses=responses,
            summary=f"Open Inference Protocol: {summary}.",
            openapi_extra=infer_request if method == "POST" else None,
        )


def _in_our_shape(scope: Any, send: Any) -> Any:
    """``send``, with a 404 or 405 from the routing replaced by our JSON error (one of ours, a
    route's own 404 such as ``unknown_model``, carries its request id: it passes)."""
    replaced: dict[str, Any] = {}

    async def shaped(message: Any) -> None:
        if message["type"] == "http.response.start" and message["status"] in (404, 405):
            headers = dict(message.get("headers", []))
            if b"x-request-id" not in headers:
                replaced["status"] = message["status"]
                replaced["allow"] = headers.get(b"allow", b"").decode()
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
            rid = request_id(Request(scope).headers.get("x-request-id", ""))
            await error_response(error, rid)({"type": "http"}, _no_receive, send)

    return shaped


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}
