"""Every answer the HTTP API gives, built here and nowhere else: an image's answer (predictions,
attention, patches, image, model, ``timing_ms``), a batch's slots, the error envelope (also as
the pre-rendered bytes the admission gate and the header deadline write straight to the socket),
and ``GET /model``.

The shapes are the pydantic models in ``service/web/schemas.py`` (the OpenAPI document; the HTTP
tests validate real answers against them); this module fills them as plain dicts and orjson
writes them, which costs a fraction of building and validating model objects per request. What
every answer of a model shares (patch metadata, the model block) is built once per model.
"""

from __future__ import annotations

import functools
import heapq
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

from ..errors import ApiError
from ..metrics import Metrics
from ..model.geometry import crop_window, patch_box
from ..model.imaging import ALLOWED_FORMATS
from ..model.loading import ModelInfo
from ..runtime.settings import Settings
from .options import Options
from .pipeline import Scored

__all__ = [
    "AnswerBuilder",
    "JsonResponse",
    "describe_model",
    "error_response",
    "header_timeout_bytes",
    "oip_error_body",
    "oip_error_response",
    "refusal_bytes",
    "top_k",
    "top_patches",
]

TOP_PATCHES = 5


class JsonResponse(Response):
    """JSON written by orjson (several times faster than the standard encoder)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# --- errors ------------------------------------------------------------------------------------
def error_response(exc: ApiError, request_id: str) -> JsonResponse:
    """The error envelope ``{"error": {"code", "message"}}`` with the error's status and headers."""
    return JsonResponse(
        exc.body(), status_code=exc.status, headers={**exc.headers, "X-Request-ID": request_id}
    )


def oip_error_body(exc: ApiError) -> dict[str, Any]:
    """The Open Inference Protocol's error body: ``{"error": "<code>: <message>"}``."""
    return {"error": f"{exc.code}: {exc.message}"}


def oip_error_response(exc: ApiError, request_id: str) -> JsonResponse:
    """An error in the Open Inference Protocol's shape, with the status and headers of the
    native API's table."""
    return JsonResponse(
        oip_error_body(exc),
        status_code=exc.status,
        headers={**exc.headers, "X-Request-ID": request_id},
    )


@functools.lru_cache(maxsize=8)  # admission refuses with one of two errors, built once
def refusal_bytes(refusal: ApiError, oip: bool = False) -> tuple[bytes, bytes]:
    """A 503 refusal as the admission gate writes it to the socket, but for its request id:
    the bytes before the id, and the bytes after it; ``oip``: in the Open Inference
    Protocol's shape (``service/web/oip.py``)."""
    shaped = oip_error_body(refusal) if oip else refusal.body()
    body = orjson.dumps(shaped)
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: %s\r\nx-request-id: "
        % (len(body), refusal.headers["Retry-After"].encode())
    )
    return head, b"\r\n\r\n" + body


@functools.lru_cache(maxsize=1)
def header_timeout_bytes(seconds: float) -> bytes:
    """The 408 a connection gets when its request's headers are late; the connection closes."""
    body = orjson.dumps(
        ApiError(
            408,
            "header_timeout",
            f"The request headers did not arrive within {seconds:g} s.",
        ).body()
    )
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


# --- classifications ---------------------------------------------------------------------------
class AnswerBuilder:
    """Builds the answers (``ClassifyResponse``, or a list of ``BatchItem``) for one model."""

    def __init__(self, info: ModelInfo, metrics: Metrics) -> None:
        self.info = info
        self.metrics = metrics
        self._grid = list(info.grid)
        self._patches = {
            "patch_size": list(info.patch_size),
            "grid": self._grid,
            "num_patches": info.num_patches,
            "patch_dim": info.patch_dim,
            "embed_dim": info.embed_dim,
            "num_prefix_tokens": info.num_prefix_tokens,
            "sequence_length": info.sequence_length,
            "position_embedding": {
                "kind": info.position_embedding_kind,
                "shape": list(info.position_embedding_shape or []),
            },
            "input_size": list(info.input_size),
        }
        self._model = {
            "name": info.name,
            "source": info.source,
            "dtype": info.dtype,
            "device": info.device,
            "version": info.version,
        }

    def respond(
        self,
        scored: Sequence[Scored],
        options: Options,
        *,
        request_id: str,
        started: float,
        filenames: Sequence[str | None] | None,
    ) -> JsonResponse:
        """The answer to a request: one image's answer (or its error), or, with ``filenames``
        (``/classify_batch``), one slot per image in upload order."""
        headers = {"X-Request-ID": request_id}
        if filenames is None:
            (one,) = scored
            if isinstance(one.result, ApiError):
                return error_response(one.result, request_id)
            return JsonResponse(self._image(one, options, request_id, started), headers=headers)
        items = []
        for index, (each, filename) in enumerate(zip(scored, filenames, strict=True)):
            if isinstance(each.result, ApiError):
                slot = each.result.body() | {"status": each.result.status}
            else:
                slot = self._image(each, options, f"{request_id}-{index}", started)
            items.append({"index": index, "filename": filename, **slot})
        return JsonResponse(items, headers=headers)

    def _image(
        self, scored: Scored, options: Options, request_id: str, started: float
    ) -> dict[str, Any]:
        built = time.perf_counter()
        out, image, info = scored.result, scored.facts, self.info
        assert not isinstance(out, ApiError) and image is not None
        if out.model is not None and out.model is not info:  # the version before a swap
            return AnswerBuilder(out.model, self.metrics)._image(
                scored, options, request_id, started
            )
        weights = out.attention
        answer: dict[str, Any] = {
            "request_id": request_id,
            "predictions": top_k(out.probs, options.top_k, info.label_names),
        }
        if weights is not None:
            attention: dict[str, Any] = {
                "mode": options.attention,
                "grid": self._grid,
                "weights": np.round(weights.astype(np.float64), 6).tolist(),
            }
            if scored.heatmap_png is not None:
                attention["heatmap_png"] = scored.heatmap_png
            answer["attention"] = attention
        crop = crop_window(image.height, image.width, info)
        answer["patches"] = {
            **self._patches,
            "crop_box": [round(c, 2) for c in crop],
            "top": []
            if weights is None
            else top_patches(weights, TOP_PATCHES, info, image.width, image.height, crop),
        }
        answer["image"] = {
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "mode": image.mode,
            "sha256": image.sha256,
        }
        answer["model"] = self._model
        if scored.cache is not None:
            answer["cache"] = scored.cache
        post_s = scored.heatmap_s + time.perf_counter() - built
        self.metrics.observe_stage("postprocess", post_s)
        answer["timing_ms"] = {
            "decode": round(scored.decode_s * 1e3, 3),
            "queue": round(out.queue_s * 1e3, 3),
            "inference": round(out.inference_ms, 3),
            "postprocess": round(post_s * 1e3, 3),
            "total": round((time.perf_counter() - started) * 1e3, 3),
            "batch_size": out.batch_size,
        }
        return answer


def top_k(probs: np.ndarray, k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """The k most probable classes, highest first (ties: the lower index first)."""
    values = probs.tolist()
    return [{"index": i, "label": labels[i], "score": values[i]} for i in _largest(values, k)]


def top_patches(
    weights: np.ndarray,
    count: int,
    info: ModelInfo,
    width: int,
    height: int,
    crop: tuple[float, float, float, float] | None = None,
) -> list[dict[str, Any]]:
    """The ``count`` most-attended patches with their boxes in original pixels."""
    values = weights.reshape(-1).tolist()
    order = _largest(values, count)
    cols = info.grid[1]
    crop = crop or crop_window(height, width, info)
    return [
        {
            "index": i,
            "row": i // cols,
            "col": i % cols,
            "attention": values[i],
            "box": patch_box(i // cols, i % cols, info, width, height, crop),
        }
        for i in order
    ]


def _largest(values: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest ``values``, largest first, ties in index order.

    In Python on a list, not numpy: this runs on the event loop for every answer, and numpy's
    sorts and partitions release the GIL even for 10 values, so beside a busy decode or model
    thread each call then waits up to the switch interval to get it back: ~0.2-0.9 ms for 10
    classes, ~5 ms for 1,000 (``python -m loadtests.gil_contention``). ``heapq.nlargest`` is
    stable like ``sorted(..., reverse=True)`` and takes ~0.1 ms for 1,000 classes."""
    return heapq.nlargest(count, range(len(values)), key=values.__getitem__)


# --- GET /model --------------------------------------------------------------------------------
def describe_model(
    info: ModelInfo,
    settings: Settings,
    *,
    ready: bool,
    warmup_ms: float,
    runtime: Mapping[str, Any],
) -> dict[str, Any]:
    """GET /model: metadata, labels, preprocessing, batching, limits and the process layout."""
    return {
        "model": info.as_dict(),
        "labels": list(info.label_names),
        "preprocessing": {
            "input_size": list(info.input_size),
            "resize_shorter_side_to": info.resize_size,
            "crop_pct": info.crop_pct,
            "crop_mode": info.crop_mode,
            "interpolation": info.interpolation,
            "mean": list(info.mean),
            "std": list(info.std),
            "on_device": info.device,
        },
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue_images": settings.max_queue_images,
            "max_images_per_request": settings.max_images_per_request,
        },
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_pixels": settings.max_pixels,
            "min_side": settings.min_side,
            "max_aspect_ratio": settings.max_aspect_ratio,
            "allowed_formats": sorted(ALLOWED_FORMATS),
        },
        "defaults": {"top_k": settings.default_top_k, "attention": settings.default_attention},
        "runtime": dict(runtime),
        "ready": ready,
        "warmup_ms": round(warmup_ms, 1),
    }
