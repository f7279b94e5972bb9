"""The BentoML service ``vit-classifier``: HTTP wiring only.

Routes live on a FastAPI app mounted into the service (so ``/docs.json`` documents them beside
BentoML's ``/healthz``, ``/livez``, ``/readyz`` and ``/metrics``); each one parses the request,
calls ``service.api.Classifier`` and maps its errors to JSON statuses. Run with
``bentoml serve service.service:VitClassifier``.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from .api import ApiError, Classifier, parse_options
from .http import read_request
from .metrics import bound_traffic_labels, create_metrics
from .schemas import BatchItem, ClassifyResponse, ErrorResponse, ModelResponse
from .settings import load_settings

__all__ = ["VitClassifier", "app"]

_logger = logging.getLogger(__name__)

SETTINGS = load_settings()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

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
    status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 503)
}


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _error(exc: ApiError, request_id: str) -> JSONResponse:
    return JSONResponse(
        exc.body(), status_code=exc.status, headers={**exc.headers, "X-Request-ID": request_id}
    )


@bentoml.service(
    name="vit-classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(app, path="/")
class VitClassifier:
    """Loads the model in the background; ``/readyz`` turns 200 once it is warmed up."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.metrics = create_metrics(SETTINGS.max_batch_size)
        self.classifier = Classifier(SETTINGS, self.metrics)
        self.classifier.start_loading()

    def __is_ready__(self) -> bool:
        return self.classifier.ready

    @bentoml.on_shutdown
    async def _shutdown(self) -> None:
        await self.classifier.aclose()

    async def _classify(self, request: Request, *, batch: bool) -> JSONResponse:
        request_id = _request_id(request)
        metrics = self.metrics
        metrics.inflight.inc()
        endpoint = "classify_batch" if batch else "classify"
        started = time.perf_counter()
        file_count = 1
        try:
            classifier = self.classifier
            info = classifier.info
            max_files = SETTINGS.max_images_per_request if batch else 1
            parsed = await read_request(
                request,
                file_field="images" if batch else "image",
                max_files=max_files,
                max_body_bytes=SETTINGS.max_body_bytes,
            )
            file_count = parsed.file_count
            options = parse_options(parsed.fields, info.num_classes, SETTINGS)
            results = await classifier.classify(parsed.uploads, options, request_id)
        except ApiError as exc:
            self.classifier.count([exc] * file_count)
            return _error(exc, request_id)
        finally:
            metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)
            metrics.inflight.dec()

        headers = {"X-Request-ID": request_id}
        if not batch:
            result = results[0]
            if isinstance(result, ApiError):
                return _error(result, request_id)
            return JSONResponse(result, headers=headers)
        items = []
        for index, (result, upload) in enumerate(zip(results, parsed.uploads, strict=True)):
            slot = (
                result.body() | {"status": result.status}
                if isinstance(result, ApiError)
                else result
            )
            items.append({"index": index, "filename": upload.filename, **slot})
        return JSONResponse(items, headers=headers)

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        summary="Classify one image (multipart field 'image'; optional top_k, attention, heatmap).",
    )
    async def classify(self, request: Request) -> JSONResponse:
        return await self._classify(request, batch=False)

    @app.post(
        "/classify_batch",
        response_model=list[BatchItem],
        responses=_ERRORS,
        summary="Classify several images (field 'images' repeated); one slot per image, in order.",
    )
    async def classify_batch(self, request: Request) -> JSONResponse:
        return await self._classify(request, batch=True)

    @app.get("/model", response_model=ModelResponse, responses=_ERRORS)
    async def model(self) -> JSONResponse:
        try:
            return JSONResponse(self.classifier.describe())
        except ApiError as exc:
            return _error(exc, uuid.uuid4().hex)


@functools.cache
def _known_paths() -> frozenset[str]:
    """Paths that get their own traffic-metric label: our routes and BentoML's pages."""
    return frozenset(app.openapi()["paths"]) | {
        "/", "/docs.json", "/schema.json", "/ui", "/ui/", "/healthz", "/livez", "/readyz",
    }  # fmt: skip


bound_traffic_labels(_known_paths)
