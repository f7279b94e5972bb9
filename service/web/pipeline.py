"""What an HTTP worker does with the images of a request, whatever front door they came through:
decode, send to the model, paint heatmaps, count.

Each upload is decoded and validated on its own (inline when small, else in this worker's decode
pool) before it goes to the model, so a bad image can only ever fail itself. The model is the
worker's ``Backend`` (``service/backend.py``): its own model or the model processes; the pipeline
never asks which. The front door turns the ``Scored`` images into its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..backend import version_info
from ..errors import ApiError
from ..metrics import Metrics
from ..model.engine import Outcome, Work
from ..model.imaging import (
    ALLOWED_FORMATS,
    DecodedImage,
    ImageLimits,
    decode_image,
    image_from_pixels,
    inspect_image,
)
from ..runtime.settings import Settings
from .cache import Cached, CacheKey, Facts, ResponseCache, cache_key
from .heatmaps import heatmap_png
from .options import Options
from .reading import Upload

if TYPE_CHECKING:
    from ..backend import Backend

__all__ = ["CLIENT_KEY", "INLINE_DECODE_BYTES", "ImageFacts", "Pipeline", "Pixels", "Scored"]

# The header that keeps a client with one version while a canary serves a share.
CLIENT_KEY = "x-client-key"
# Uploads up to this size are decoded on the event loop (see Pipeline._prepare).
INLINE_DECODE_BYTES = 32 * 1024


class ImageFacts(Protocol):
    """What an answer says about the upload (``DecodedImage`` or ``ImageHeader``)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True, eq=False)
class Pixels:
    """One image a client decoded itself: RGB, uint8, HxWx3 (the Open Inference Protocol's
    ``pixels`` input)."""

    array: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass(frozen=True)
class Scored:
    """One image of a request, through the model: its answer's parts, or its error."""

    facts: ImageFacts | None  # None: refused before its header could be read
    result: Outcome | ApiError
    decode_s: float
    heatmap_png: str | None = None
    heatmap_s: float = 0.0
    cache: str | None = None  # with the response cache on: "hit" or "miss"


# One upload after decoding: its facts (or error), the model's Work, the decode seconds.
_Prepared = tuple[ImageFacts | ApiError, Work | None, float]


class Pipeline:
    """Decode -> model -> heatmaps for one HTTP worker."""

    def __init__(self, settings: Settings, metrics: Metrics, decode_threads: int) -> None:
        self.metrics = metrics
        self.limits = ImageLimits(
            max_pixels=settings.max_pixels,
            min_side=settings.min_side,
            max_aspect_ratio=settings.max_aspect_ratio,
        )
        self._threads = decode_threads
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="vit-decode")
        self.cache = ResponseCache(settings.cache_bytes, metrics)

    def warm(self) -> None:
        """Before the worker listens: decode a small image of every accepted format here (the
        path small uploads take) and on each decode thread (started now, all of them), so no
        request pays for a decoder's or a thread's first use."""
        samples = _warm_samples()
        threads = self._threads
        barrier = threading.Barrier(threads)

        def decode_all(wait: bool) -> None:
            if wait:  # every thread holds one task at once: the pool starts them all
                barrier.wait(timeout=10)
            for data in samples:
                decode_image(data, min_short_side=1, limits=self.limits)

        decode_all(wait=False)
        for future in [self._pool.submit(decode_all, True) for _ in range(threads)]:
            future.result()

    def close(self) -> None:
        """Stop the decode threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(
        self,
        backend: Backend,
        uploads: Sequence[Upload] | Sequence[Pixels],
        options: Options,
        announced: contextlib.ExitStack | None = None,
        client_key: str | None = None,
        version: str | None = None,
    ) -> list[Scored]:
        """Each upload (or client-decoded image) through the model ``backend``, in order; with the
        response cache on, an upload seen before under the same model version and options is
        answered from it (``service/web/cache.py``).

        ``announced``: the request's announcement to the batcher (``Backend.arriving``), closed
        here once the images are decoded: a replica's idle model waits for announced requests.
        ``client_key``: the client's key (``X-Client-Key``), which keeps a client with one
        version while a canary takes a share of the requests. ``version``: the one the request
        names (the protocol's ``/versions/{v}``), which answers it whatever the shares.

        Raises:
            ApiError: the model refused the whole request (not ready, overloaded, failed).
        """
        cache = self.cache
        info = backend.route(client_key) if version is None else version_info(backend, version)
        if not cache.enabled:
            return await self._run(backend, uploads, options, announced, info.version)
        cache.served(info.name, backend.versions())
        keys = [
            cache_key(u.data, info.name, info.version, options) if isinstance(u, Upload) else None
            for u in uploads
        ]
        hits = [None if key is None else cache.get(key) for key in keys]
        missed = [i for i, hit in enumerate(hits) if hit is None]
        if missed:
            picked = [uploads[i] for i in missed]
            fresh = iter(await self._run(backend, picked, options, announced, info.version))
        elif announced is not None:
            announced.close()
        scored: list[Scored] = []
        for key, hit in zip(keys, hits, strict=True):
            if hit is None:
                each = dataclasses.replace(next(fresh), cache="miss")
                self._keep(key, each, info.version)
            else:
                out = hit.outcome
                again = Outcome(out.probs, out.attention, 0, 0.0, 0.0, out.model)
                each = Scored(hit.facts, again, 0.0, hit.heatmap_png, cache="hit")
                self.count([again], backend)
            scored.append(each)
        return scored

    def _keep(self, key: CacheKey | None, scored: Scored, version: str) -> None:
        """Cache an image's answer: one the model gave (not an error) under ``version``."""
        out, facts = scored.result, scored.facts
        if key is None or not isinstance(out, Outcome) or facts is None:
            return
        if out.model is not None and out.model.version != version:  # answered across a swap
            return
        kept = Facts(facts.width, facts.height, facts.format, facts.mode, facts.sha256)
        self.cache.put(key, Cached(kept, out, scored.heatmap_png))

    async def _run(
        self,
        backend: Backend,
        uploads: Sequence[Upload | Pixels],
        options: Options,
        announced: contextlib.ExitStack | None,
        version: str,
    ) -> list[Scored]:
        try:
            prepared = await self._prepare(backend, uploads, options)
        finally:
            if announced is not None:
                announced.close()
        good = [i for i, (_, work, _) in enumerate(prepared) if work is not None]
        works = [prepared[i][1] for i in good]
        outcomes = await backend.infer(works, version)  # type: ignore[arg-type]
        done = dict(zip(good, outcomes, strict=True))
        scored: list[Scored] = []
        for index, (facts, _work, decode_s) in enumerate(prepared):
            out = done.get(index)
            if isinstance(facts, ApiError) or out is None:
                scored.append(Scored(None, facts if isinstance(facts, ApiError) else _LOST, 0.0))
                continue
            if isinstance(out, ApiError):
                scored.append(Scored(facts, out, decode_s))
                continue
            self.metrics.observe_stage("decode", decode_s)
            scored.append(await self._painted(backend, facts, out, decode_s, options))
        self.count([each.result for each in scored], backend)
        return scored

    def count(self, results: Sequence[Outcome | ApiError], backend: Backend | None = None) -> None:
        """Count each image's outcome (and each error's code) in the metrics (an answer under
        the version that gave it: ``backend``'s when it does not say)."""
        for result in results:
            if isinstance(result, ApiError):
                outcome = "client_error" if result.status < 500 else "server_error"
                self.metrics.images.labels(outcome=outcome).inc()
                self.metrics.image_errors.labels(code=result.code).inc()
            else:
                self.metrics.images.labels(outcome="ok").inc()
                model = result.model or (backend.info if backend is not None else None)
                if model is None:
                    continue
                self.metrics.version_images.labels(model=model.name, version=model.version).inc()

    async def _prepare(
        self, backend: Backend, uploads: Sequence[Upload | Pixels], options: Options
    ) -> list[_Prepared]:
        """Decode (or, for the device, inspect) each upload: its facts or error, its Work."""
        on_device = backend.decodes_on_device and not options.heatmap
        min_side = backend.info.resize_size
        loop = asyncio.get_running_loop()

        def prepare(upload: Upload | Pixels) -> _Prepared:
            t0 = time.perf_counter()
            try:
                if isinstance(upload, Pixels):
                    image = image_from_pixels(
                        upload.array, min_short_side=min_side, limits=self.limits
                    )
                    return image, Work(options.attention, image.pixels), time.perf_counter() - t0
                if on_device:
                    header = inspect_image(upload.data, limits=self.limits)
                    if header.format == "JPEG":
                        work = Work(options.attention, jpeg=upload.data)
                        return header, work, time.perf_counter() - t0
                image = decode_image(upload.data, min_short_side=min_side, limits=self.limits)
                return image, Work(options.attention, image.pixels), time.perf_counter() - t0
            except ApiError as exc:
                return exc, None, time.perf_counter() - t0

        first = uploads[0]
        size = first.nbytes if isinstance(first, Pixels) else len(first.data)
        if len(uploads) == 1 and size <= INLINE_DECODE_BYTES:
            # A small upload decodes in well under a millisecond: cheaper here than the two
            # thread hand-offs (and GIL switches) of a trip through the pool.
            return [prepare(uploads[0])]
        with backend.arriving(len(uploads)):
            return list(
                await asyncio.gather(
                    *(loop.run_in_executor(self._pool, prepare, upload) for upload in uploads)
                )
            )

    async def _painted(
        self, backend: Backend, facts: ImageFacts, out: Outcome, decode_s: float, options: Options
    ) -> Scored:
        """The image's Scored, with its heatmap when asked (painted in the decode pool)."""
        if not (options.heatmap and out.attention is not None and isinstance(facts, DecodedImage)):
            return Scored(facts, out, decode_s)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        png = await loop.run_in_executor(
            self._pool, heatmap_png, facts, out.attention, backend.info
        )
        return Scored(facts, out, decode_s, png, time.perf_counter() - started)


_LOST = ApiError(500, "inference_failed", "The model gave no answer for this image.")


def _warm_samples() -> list[bytes]:
    """A 16x16 picture in each accepted format (``Pipeline.warm``)."""
    from PIL import Image

    pixels = np.linspace(0, 255, 16 * 16 * 3).astype(np.uint8).reshape(16, 16, 3)
    samples = []
    for fmt in sorted(ALLOWED_FORMATS):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        samples.append(buffer.getvalue())
    return samples
