"""The model side of the service: load and warm up one model, then run shared batches.

``ModelRunner`` owns the ``Engine`` (the model on its device) and the ``MicroBatcher`` that fuses
the images of concurrent requests. It takes ``Work`` (an image already decoded by Pillow, or a
JPEG to decode on the device) and gives back one ``Outcome`` or ``ApiError`` per image. It runs
inside each HTTP worker (``replicas``) or alone in a model process behind
``service/transport.py`` (``split``); either way it writes the batch-side metrics.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batching import BatchStats, MicroBatcher, Overloaded
from .errors import ApiError
from .imaging import ImageLimits, decode_image
from .loading import ModelInfo, ModelLoadError, load_model
from .metrics import Metrics
from .options import AttentionMode
from .settings import Settings

__all__ = ["ModelRunner", "Outcome", "Work", "load_failed", "not_ready", "settle_heap"]

_logger = logging.getLogger(__name__)

# torchvision 0.29 warns on every decode_jpeg call that TorchCodec supersedes it; decode_jpeg is
# what decodes nvJPEG batches with this torch pin (docs/ARCHITECTURE.md, *GPU data path*).
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)


@dataclass(frozen=True)
class Work:
    """One image for the model: Pillow-decoded pixels, or JPEG bytes to decode on the device."""

    mode: AttentionMode
    pixels: np.ndarray | None = None  # uint8 HWC
    jpeg: bytes | None = None


@dataclass(frozen=True)
class Outcome:
    """One image's answer from the model."""

    probs: np.ndarray  # (num_classes,) float32
    attention: np.ndarray | None  # (rows, cols) float32, or None for attention "none"
    batch_size: int  # images in the forward pass it rode in
    inference_ms: float  # that batch's preprocess + forward + attention
    queue_s: float  # from joining the queue to its batch starting


def settle_heap() -> None:
    """Move everything allocated so far (torch, timm, BentoML: hundreds of thousands of
    objects) out of the garbage collector's sight. Without it a full collection now and then
    walks them all mid-request: one replica's p99 at 16 clients went from ~270 ms to ~50 ms."""
    gc.collect()
    gc.freeze()


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


class ModelRunner:
    """One model on one device, with its batcher; ``infer`` is safe to call from the event loop.

    Args:
        settings: batching limits, model source, dtype.
        metrics: where the batch-side figures go.
        device: 'cpu', 'cuda:N' or 'auto'.
        threads: torch intra-op threads for this process.
    """

    def __init__(self, settings: Settings, metrics: Metrics, *, device: str, threads: int) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = device
        self.threads = threads
        self.warmup_ms = 0.0
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._engine: Any = None
        self._batcher: MicroBatcher[Work, Outcome | ApiError] | None = None
        self._limits = ImageLimits(
            max_pixels=settings.max_pixels,
            min_side=settings.min_side,
            max_aspect_ratio=settings.max_aspect_ratio,
        )

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up at the largest batch size."""
        return self._ready.is_set()

    @property
    def info(self) -> ModelInfo:
        """The loaded model's metadata (503 ``not_ready`` before that)."""
        if self._engine is None:
            raise self._not_ready()
        info: ModelInfo = self._engine.info
        return info

    @property
    def decodes_on_device(self) -> bool:
        """Whether JPEG uploads should reach the model undecoded (``Work.jpeg``)."""
        mode = self.settings.device_decode
        return mode == "on" or (mode == "auto" and self.info.device.startswith("cuda"))

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return 0 if self._batcher is None else self._batcher.queued

    @property
    def queue_full(self) -> bool:
        """Whether the next image would be refused (``VIT_MAX_QUEUE_IMAGES`` are waiting)."""
        return self.queued >= self.settings.max_queue_images

    def load(self) -> None:
        """Load, warm up and open for traffic (blocking; run it off the event loop)."""
        from .engine import Engine

        settings = self.settings
        try:
            torch.set_num_threads(self.threads)
            with contextlib.suppress(RuntimeError):  # only settable before any parallel work
                torch.set_num_interop_threads(1)
            loaded = load_model(settings.model, device=self.device, dtype=settings.dtype)
            engine = Engine(loaded, script=settings.torchscript)
            self.warmup_ms = engine.warmup(settings.max_batch_size)
        except Exception as exc:
            message = str(exc)
            if not isinstance(exc, ModelLoadError):
                message = f"{type(exc).__name__}: {message}"
            self.load_error = message if message.endswith(".") else f"{message}."
            _logger.exception("the model failed to load (VIT_MODEL=%s): %s", settings.model, exc)
            raise
        self._engine = engine
        self._batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1e3,
            max_queue=settings.max_queue_images,
            on_batch=self._on_batch,
        )
        info = engine.info
        self.metrics.model_info.labels(
            model=info.name, source=info.source, dtype=info.dtype, device=info.device
        ).set(1)
        _logger.info(
            "ready: %s on %s warmed up at batch %d in %.0f ms (%d torch threads)",
            info.name,
            info.device,
            settings.max_batch_size,
            self.warmup_ms,
            torch.get_num_threads(),
        )
        settle_heap()
        self._ready.set()

    def start_loading(
        self,
        on_ready: Callable[[], None] | None = None,
        on_failure: Callable[[str], object] | None = None,
    ) -> threading.Thread:
        """Load in the background so liveness answers while a large model loads."""
        thread = threading.Thread(
            target=self._load_quietly, args=(on_ready, on_failure), name="vit-load", daemon=True
        )
        thread.start()
        return thread

    @property
    def settled(self) -> bool:
        """Loading is over: ready, or failed."""
        return self.ready or self.load_error is not None

    def _load_quietly(
        self, on_ready: Callable[[], None] | None, on_failure: Callable[[str], object] | None
    ) -> None:
        # A failure is logged and kept in load_error; readiness stays false.
        try:
            self.load()
        except Exception:
            if on_failure is not None and self.load_error is not None:
                on_failure(self.load_error)
            return
        if on_ready is not None:
            on_ready()

    async def aclose(self) -> None:
        """Stop the batcher; queued callers are cancelled."""
        if self._batcher is not None:
            await self._batcher.aclose()

    def _not_ready(self) -> ApiError:
        if self.load_error:
            return load_failed(self.load_error)
        return not_ready()

    # --- requests --------------------------------------------------------------------------
    def arriving(self, count: int) -> contextlib.AbstractContextManager[None]:
        """Announce images being decoded in this process, so an idle model waits for them."""
        if self._batcher is None:
            return contextlib.nullcontext()
        return self._batcher.arriving(count)

    async def infer(self, works: Sequence[Work]) -> list[Outcome | ApiError]:
        """Run ``works`` in the shared batches; one Outcome (or per-image ApiError) each.

        Raises:
            ApiError: 503 ``not_ready`` before warm-up, 503 ``overloaded`` (with Retry-After)
                when the queue is full, 500 ``inference_failed`` when the batch failed.
        """
        if not self.ready or self._batcher is None:
            raise self._not_ready()
        try:
            done = await self._batcher.submit(works)
        except Overloaded as exc:
            raise ApiError(
                503, "overloaded", str(exc), {"Retry-After": str(max(1, round(exc.retry_after_s)))}
            ) from exc
        except Exception as exc:
            _logger.exception("inference failed")
            raise ApiError(500, "inference_failed", "The model failed on this batch.") from exc
        results: list[Outcome | ApiError] = []
        for out, queue_s in done:
            if isinstance(out, Outcome):
                out = Outcome(out.probs, out.attention, out.batch_size, out.inference_ms, queue_s)
            results.append(out)
        return results

    # --- the model thread ------------------------------------------------------------------
    def _run_batch(self, works: list[Work]) -> list[Outcome | ApiError]:
        engine = self._engine
        images: list[np.ndarray | torch.Tensor | ApiError | None] = [w.pixels for w in works]
        jpegs = [i for i, w in enumerate(works) if w.jpeg is not None]
        decode_s = 0.0
        if jpegs:
            started = time.perf_counter()
            decoded = self._decode_on_device([works[i].jpeg for i in jpegs])  # type: ignore[misc]
            for i, image in zip(jpegs, decoded, strict=True):
                images[i] = image
            decode_s = time.perf_counter() - started
        good = [i for i, image in enumerate(images) if not isinstance(image, ApiError)]
        result = engine.run([images[i] for i in good], [works[i].mode for i in good])
        metrics = self.metrics
        if jpegs:
            metrics.observe_stage("device_decode", decode_s)
        metrics.observe_stage("preprocess", result.preprocess_ms / 1e3)
        metrics.observe_stage("forward", result.forward_ms / 1e3)
        metrics.observe_stage("attention", result.attention_ms / 1e3)
        if engine.device.type == "cuda":
            metrics.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated())
            metrics.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved())
        inference_ms = (
            decode_s * 1e3 + result.preprocess_ms + result.forward_ms + result.attention_ms
        )
        outcomes: list[Outcome | ApiError] = [
            image if isinstance(image, ApiError) else _NO_OUTCOME for image in images
        ]
        for i, item in zip(good, result.items, strict=True):
            outcomes[i] = Outcome(item.probs, item.attention, len(good), inference_ms, 0.0)
        return outcomes

    def _decode_on_device(self, jpegs: list[bytes]) -> list[torch.Tensor | np.ndarray | ApiError]:
        """JPEGs -> HWC uint8 on the device, in one batched call (nvJPEG on CUDA).

        What the device decoder refuses (CMYK, progressive on some hardware, broken files)
        goes through Pillow one by one, with the same 4xx table as an upload decoded on the CPU.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        engine = self._engine
        device = engine.device
        min_side = engine.info.resize_size
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        out: list[torch.Tensor | np.ndarray | ApiError] = []
        try:
            decoded = decode_jpeg(
                tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
            )
            out = [_reduce_on_device(chw, min_side) for chw in decoded]
        except Exception as exc:  # one bad file fails the batched call: go one by one
            _logger.debug("batched device decode failed (%s); decoding one by one", exc)
            for data, tensor in zip(jpegs, tensors, strict=True):
                try:
                    chw = decode_jpeg(
                        tensor, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
                    )
                    out.append(_reduce_on_device(chw, min_side))
                except Exception:
                    out.append(self._pillow(data, min_side))
        return out

    def _pillow(self, data: bytes, min_side: int) -> np.ndarray | ApiError:
        try:
            return decode_image(data, min_short_side=min_side, limits=self._limits).pixels
        except ApiError as exc:
            return exc

    def _on_batch(self, stats: BatchStats) -> None:
        metrics = self.metrics
        metrics.batch_size.observe(stats.size)
        metrics.batch_fill.observe(stats.size / self.settings.max_batch_size)
        for wait in stats.waits_s:
            metrics.observe_stage("queue", wait)
        metrics.queue_depth.set(self.queued)


def _reduce_on_device(chw: torch.Tensor, min_side: int) -> torch.Tensor:
    """CHW uint8 -> HWC uint8, box-reduced by an integer factor like the Pillow path."""
    factor = min(chw.shape[1], chw.shape[2]) // min_side
    if factor >= 2:
        pooled = torch.nn.functional.avg_pool2d(chw.unsqueeze(0).float(), factor, ceil_mode=True)
        chw = pooled.squeeze(0).round_().to(torch.uint8)
    return chw.permute(1, 2, 0)


_NO_OUTCOME = ApiError(500, "inference_failed", "The model gave no answer for this image.")
