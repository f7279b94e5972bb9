"""What an HTTP worker does with a parsed request: decode, send to the model, answer.

Each upload is decoded and validated on its own (in this worker's decode pool) before it goes
to the model, so a bad image can only ever fail itself. The model is a ``Backend``: the worker's
own ``ModelRunner`` (``replicas``) or a ``ModelClient`` to the model processes (``split``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .answers import AnswerBuilder, ImageFacts
from .errors import ApiError
from .explain import heatmap_png
from .http import Upload
from .imaging import DecodedImage, ImageLimits, decode_image, inspect_image
from .inference import Outcome, Work
from .loading import ModelInfo
from .metrics import Metrics
from .options import Options
from .settings import Settings

__all__ = ["INLINE_DECODE_BYTES", "Backend", "Pipeline", "Prepared"]

# Uploads up to this size are decoded on the event loop (see Pipeline.prepare).
INLINE_DECODE_BYTES = 32 * 1024


# One upload after decoding: what the answer reports about it (or its error), the model's Work
# (None for a refused upload) and the decode seconds.
Prepared = tuple[ImageFacts | ApiError, Work | None, float]


class Backend(Protocol):
    """The model as an HTTP worker uses it."""

    @property
    def ready(self) -> bool: ...
    @property
    def info(self) -> ModelInfo: ...
    @property
    def decodes_on_device(self) -> bool: ...
    @property
    def queued(self) -> int: ...
    @property
    def queue_full(self) -> bool: ...
    def arriving(self, count: int) -> contextlib.AbstractContextManager[None]: ...
    async def infer(self, works: Sequence[Work]) -> list[Outcome | ApiError]: ...


class Pipeline:
    """Decode -> model -> answers for one HTTP worker."""

    def __init__(
        self, settings: Settings, metrics: Metrics, backend: Backend, decode_threads: int
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backend = backend
        self.decode_threads = decode_threads
        self.limits = ImageLimits(
            max_pixels=settings.max_pixels,
            min_side=settings.min_side,
            max_aspect_ratio=settings.max_aspect_ratio,
        )
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="vit-decode")
        self._answers: AnswerBuilder | None = None

    def answers(self, info: ModelInfo) -> AnswerBuilder:
        """The answer builder for the model now served (rebuilt if the model changed)."""
        if self._answers is None or self._answers.info is not info:
            self._answers = AnswerBuilder(info)
        return self._answers

    def close(self) -> None:
        """Stop the decode threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, uploads: Sequence[Upload], options: Options) -> list[Prepared]:
        """Decode (or, for the device, inspect) each upload: its facts or error, its Work."""
        backend = self.backend
        info = backend.info
        on_device = backend.decodes_on_device and not options.heatmap
        min_side = info.resize_size
        loop = asyncio.get_running_loop()

        def prepare(upload: Upload) -> Prepared:
            t0 = time.perf_counter()
            try:
                if on_device:
                    header = inspect_image(upload.data, limits=self.limits)
                    if header.format == "JPEG":
                        work = Work(options.attention, jpeg=upload.data)
                        return header, work, time.perf_counter() - t0
                image = decode_image(upload.data, min_short_side=min_side, limits=self.limits)
                return image, Work(options.attention, image.pixels), time.perf_counter() - t0
            except ApiError as exc:
                return exc, None, time.perf_counter() - t0

        if len(uploads) == 1 and len(uploads[0].data) <= INLINE_DECODE_BYTES:
            # A small upload decodes in well under a millisecond: cheaper here than the two
            # thread hand-offs (and GIL switches) of a trip through the pool.
            return [prepare(uploads[0])]
        with backend.arriving(len(uploads)):
            return list(
                await asyncio.gather(
                    *(loop.run_in_executor(self._pool, prepare, upload) for upload in uploads)
                )
            )

    async def finish(
        self, prepared: list[Prepared], options: Options, request_id: str, started: float
    ) -> list[dict[str, Any] | ApiError]:
        """Run the prepared images through the model and build each one's answer."""
        backend = self.backend
        info = backend.info
        loop = asyncio.get_running_loop()
        good = [i for i, (_, work, _) in enumerate(prepared) if work is not None]
        outcomes = await backend.infer([prepared[i][1] for i in good])  # type: ignore[misc]
        done = dict(zip(good, outcomes, strict=True))

        answers = self.answers(info)
        results: list[dict[str, Any] | ApiError] = []
        for index, (facts, _work, decode_s) in enumerate(prepared):
            out = done.get(index)
            if isinstance(facts, ApiError) or isinstance(out, ApiError) or out is None:
                results.append(out if isinstance(out, ApiError) else facts)  # type: ignore[arg-type]
                continue
            self.metrics.observe_stage("decode", decode_s)
            post_started = time.perf_counter()
            heatmap = None
            if options.heatmap and out.attention is not None and isinstance(facts, DecodedImage):
                heatmap = await loop.run_in_executor(
                    self._pool, heatmap_png, facts, out.attention, info
                )
            rid = request_id if len(prepared) == 1 else f"{request_id}-{index}"
            answer = answers.classify(facts, out, options, heatmap_png=heatmap, request_id=rid)
            post_s = time.perf_counter() - post_started
            self.metrics.observe_stage("postprocess", post_s)
            answer["timing_ms"] = {
                "decode": round(decode_s * 1e3, 3),
                "queue": round(out.queue_s * 1e3, 3),
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
        for result in results:
            if isinstance(result, ApiError):
                outcome = "client_error" if result.status < 500 else "server_error"
                self.metrics.images.labels(outcome=outcome).inc()
                self.metrics.image_errors.labels(code=result.code).inc()
            else:
                self.metrics.images.labels(outcome="ok").inc()
