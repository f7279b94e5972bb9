"""What the HTTP endpoints do, without HTTP: options, decode, batch, explain, answer.

``Classifier`` owns the model engine and the batcher. Each upload is decoded and validated on its
own before it joins a batch, so a bad image can only ever fail itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batching import BatchStats, MicroBatcher, Overloaded
from .cpus import available_cpus
from .engine import ATTENTION_MODES, AttentionMode, Engine, ItemResult, crop_window
from .explain import heatmap_png, top_k, top_patches
from .imaging import ALLOWED_FORMATS, DecodedImage, ImageError, ImageLimits, decode_image
from .loading import ModelInfo, load_model
from .metrics import Metrics
from .settings import Settings

__all__ = ["ApiError", "Classifier", "Options", "Upload", "parse_options"]

_logger = logging.getLogger(__name__)

TOP_PATCHES = 5
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ApiError(Exception):
    """A request-level error with its HTTP status and machine-readable code."""

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


@dataclass(frozen=True)
class Options:
    """Per-request choices."""

    top_k: int
    attention: AttentionMode
    heatmap: bool


@dataclass(frozen=True)
class Upload:
    """One uploaded file."""

    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class _Work:
    pixels: np.ndarray
    mode: AttentionMode


@dataclass(frozen=True)
class _Done:
    item: ItemResult
    batch_size: int
    inference_ms: float


def parse_options(fields: Mapping[str, str], num_classes: int, settings: Settings) -> Options:
    """Validate the optional form fields; 422 names the field and what it accepts."""
    raw_k = fields.get("top_k")
    if raw_k is None or raw_k == "":
        k = min(settings.default_top_k, num_classes)
    else:
        try:
            k = int(raw_k)
        except ValueError:
            k = 0
        if not 1 <= k <= num_classes:
            raise ApiError(
                422,
                "invalid_top_k",
                f"top_k must be an integer from 1 to {num_classes}, not {raw_k!r}.",
            )
    mode = fields.get("attention") or settings.default_attention
    if mode not in ATTENTION_MODES:
        raise ApiError(
            422,
            "invalid_attention",
            f"attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}.",
        )
    raw_heatmap = fields.get("heatmap", "").strip().lower()
    if raw_heatmap not in _TRUE | _FALSE:
        raise ApiError(
            422, "invalid_heatmap", f"heatmap must be true or false, not {fields['heatmap']!r}."
        )
    heatmap = raw_heatmap in _TRUE
    if heatmap and mode == "none":
        raise ApiError(
            422, "invalid_heatmap", "heatmap needs attention 'cls' or 'rollout', not 'none'."
        )
    return Options(top_k=k, attention=mode, heatmap=heatmap)


class Classifier:
    """The service's model side: load and warm up, then classify uploads in shared batches."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limits = ImageLimits(
            max_pixels=settings.max_pixels,
            min_side=settings.min_side,
            max_aspect_ratio=settings.max_aspect_ratio,
        )
        self._ready = threading.Event()
        self.load_error: str | None = None
        self.engine: Engine | None = None
        self.batcher: MicroBatcher[_Work, _Done] | None = None
        self.warmup_ms = 0.0
        # Thread pools follow the CPUs this process may use (a container's CPU quota), not the
        # host's core count; the decode pool is sized like Python's default executor.
        self.cpus = available_cpus()
        self.torch_threads = settings.torch_threads or self.cpus
        self.cpu_pool_size = min(32, self.cpus + 4)
        self._cpu_pool = ThreadPoolExecutor(self.cpu_pool_size, thread_name_prefix="vit-decode")

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up at the largest batch size."""
        return self._ready.is_set()

    @property
    def info(self) -> ModelInfo:
        """The loaded model's metadata."""
        if self.engine is None:
            raise ApiError(503, "not_ready", "The model is still loading; retry shortly.")
        return self.engine.info

    def load(self) -> None:
        """Load, warm up and open for traffic (blocking; run it off the event loop)."""
        settings = self.settings
        try:
            torch.set_num_threads(self.torch_threads)
            loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype)
            engine = Engine(loaded)
            self.warmup_ms = engine.warmup(settings.max_batch_size)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            _logger.exception("model failed to load")
            raise
        self.engine = engine
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1e3,
            max_queue=settings.max_queue_images,
            on_batch=self._on_batch,
        )
        info = engine.info
        if self.metrics is not None:
            self.metrics.model_info.labels(
                model=info.name, source=info.source, dtype=info.dtype, device=info.device
            ).set(1)
        _logger.info(
            "ready: %s warmed up at batch %d in %.0f ms (%d CPUs usable, %d torch threads)",
            info.name,
            settings.max_batch_size,
            self.warmup_ms,
            self.cpus,
            torch.get_num_threads(),
        )
        self._ready.set()

    def start_loading(self) -> threading.Thread:
        """Load in the background so liveness answers while a large model loads."""
        thread = threading.Thread(target=self._load_quietly, name="vit-load", daemon=True)
        thread.start()
        return thread

    def _load_quietly(self) -> None:
        # A failure is logged and kept in load_error; readiness stays false.
        with contextlib.suppress(Exception):
            self.load()

    async def aclose(self) -> None:
        """Stop the batcher and the decode threads."""
        if self.batcher is not None:
            await self.batcher.aclose()
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)

    # --- the model thread ------------------------------------------------------------------
    def _run_batch(self, work: list[_Work]) -> list[_Done]:
        assert self.engine is not None
        result = self.engine.run([w.pixels for w in work], [w.mode for w in work])
        if self.metrics is not None:
            self.metrics.observe_stage("preprocess", result.preprocess_ms / 1e3)
            self.metrics.observe_stage("forward", result.forward_ms / 1e3)
            self.metrics.observe_stage("attention", result.attention_ms / 1e3)
            if self.engine.device.type == "cuda":
                self.metrics.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated())
                self.metrics.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved())
        inference_ms = result.preprocess_ms + result.forward_ms + result.attention_ms
        return [_Done(item, len(work), inference_ms) for item in result.items]

    def _on_batch(self, stats: BatchStats) -> None:
        if self.metrics is None:
            return
        self.metrics.batch_size.observe(stats.size)
        self.metrics.batch_fill.observe(stats.size / self.settings.max_batch_size)
        for wait in stats.waits_s:
            self.metrics.observe_stage("queue", wait)
        assert self.batcher is not None
        self.metrics.queue_depth.set(self.batcher.queued)

    # --- requests --------------------------------------------------------------------------
    def _require_ready(self) -> tuple[Engine, MicroBatcher[_Work, _Done]]:
        if not self.ready or self.engine is None or self.batcher is None:
            message = "The model is still loading; retry shortly."
            if self.load_error:
                message = f"The model failed to load ({self.load_error}); see the server log."
            raise ApiError(503, "not_ready", message, {"Retry-After": "5"})
        return self.engine, self.batcher

    async def classify(
        self,
        uploads: Sequence[Upload],
        options: Options,
        request_id: str | None = None,
    ) -> list[dict[str, Any] | ApiError]:
        """Classify each upload; a bad one yields its ApiError in its slot, the rest go on."""
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        engine, batcher = self._require_ready()
        info = engine.info
        min_side = info.resize_size
        loop = asyncio.get_running_loop()

        def decode(upload: Upload) -> tuple[DecodedImage | ApiError, float]:
            t0 = time.perf_counter()
            try:
                image: DecodedImage | ApiError = decode_image(
                    upload.data, min_short_side=min_side, limits=self.limits
                )
            except ImageError as exc:
                image = ApiError(exc.status, exc.code, exc.message)
            return image, time.perf_counter() - t0

        with batcher.arriving(len(uploads)):
            decoded = await asyncio.gather(
                *(loop.run_in_executor(self._cpu_pool, decode, upload) for upload in uploads)
            )
        good = [i for i, (image, _) in enumerate(decoded) if isinstance(image, DecodedImage)]
        work = [_Work(decoded[i][0].pixels, options.attention) for i in good]  # type: ignore[union-attr]
        try:
            outputs = await batcher.submit(work)
        except Overloaded as exc:
            raise ApiError(
                503, "overloaded", str(exc), {"Retry-After": str(max(1, round(exc.retry_after_s)))}
            ) from exc
        except Exception as exc:
            _logger.exception("inference failed for request %s", request_id)
            raise ApiError(500, "inference_failed", "The model failed on this batch.") from exc
        done = dict(zip(good, outputs, strict=True))

        results: list[dict[str, Any] | ApiError] = []
        for index, (image, decode_s) in enumerate(decoded):
            if self.metrics is not None and index in done:
                self.metrics.observe_stage("decode", decode_s)
            if isinstance(image, ApiError):
                results.append(image)
                continue
            out, queue_s = done[index]
            post_started = time.perf_counter()
            answer = await self._answer(image, out, options, info, loop)
            post_s = time.perf_counter() - post_started
            if self.metrics is not None:
                self.metrics.observe_stage("postprocess", post_s)
            answer["request_id"] = request_id if len(uploads) == 1 else f"{request_id}-{index}"
            answer["timing_ms"] = {
                "decode": round(decode_s * 1e3, 3),
                "queue": round(queue_s * 1e3, 3),
                "inference": round(out.inference_ms, 3),
                "postprocess": round(post_s * 1e3, 3),
                "total": round((time.perf_counter() - started) * 1e3, 3),
                "batch_size": out.batch_size,
            }
            results.append(answer)
        self.count(results)
        return results

    def count(self, results: Sequence[dict[str, Any] | ApiError]) -> None:
        """Count each image's outcome (and each error's code) in the metrics."""
        if self.metrics is None:
            return
        for result in results:
            if isinstance(result, ApiError):
                outcome = "client_error" if result.status < 500 else "server_error"
                self.metrics.images.labels(outcome=outcome).inc()
                self.metrics.image_errors.labels(code=result.code).inc()
            else:
                self.metrics.images.labels(outcome="ok").inc()

    async def _answer(
        self,
        image: DecodedImage,
        out: _Done,
        options: Options,
        info: ModelInfo,
        loop: asyncio.AbstractEventLoop,
    ) -> dict[str, Any]:
        item = out.item
        weights = item.attention
        crop = crop_window(image.height, image.width, info)
        answer: dict[str, Any] = {
            "predictions": top_k(item.probs, options.top_k, info.label_names),
        }
        if weights is not None:
            attention: dict[str, Any] = {
                "mode": options.attention,
                "grid": list(info.grid),
                "weights": np.round(weights.astype(np.float64), 6).tolist(),
            }
            if options.heatmap:
                attention["heatmap_png"] = await loop.run_in_executor(
                    self._cpu_pool, heatmap_png, image, weights, info
                )
            answer["attention"] = attention
        answer["patches"] = {
            "patch_size": list(info.patch_size),
            "grid": list(info.grid),
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
            "crop_box": [round(c, 2) for c in crop],
            "top": []
            if weights is None
            else top_patches(weights, TOP_PATCHES, info, image.width, image.height),
        }
        answer["image"] = {
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "mode": image.mode,
            "sha256": image.sha256,
        }
        answer["model"] = {
            "name": info.name,
            "source": info.source,
            "dtype": info.dtype,
            "device": info.device,
        }
        return answer

    def describe(self) -> dict[str, Any]:
        """GET /model: metadata, labels, preprocessing and batching configuration."""
        info = self.info
        settings = self.settings
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
            "runtime": {
                "cpus": self.cpus,
                "torch_threads": torch.get_num_threads(),
                "decode_threads": self.cpu_pool_size,
            },
            "ready": self.ready,
            "warmup_ms": round(self.warmup_ms, 1),
        }
