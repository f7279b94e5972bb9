"""One model on one device, loaded, warmed up and fed shared batches.

``ModelRunner`` owns the ``Engine`` (the model on its device) and the ``MicroBatcher`` that fuses
the images of concurrent requests into the engine's batches. It takes ``Work`` (an image already
decoded by Pillow, or a JPEG to decode on the device) and gives back one ``Outcome`` or
``ApiError`` per image. It runs inside each HTTP worker (``replicas``: ``service/backend.py``'s
local backend) or alone in a model process behind ``service/link/server.py`` (``split``); either
way it writes the batch-side metrics.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ApiError, load_failed, not_ready, overloaded
from ..metrics import Metrics
from ..runtime.settings import Settings
from .batching import BatchStats, FileGate, Gate, MicroBatcher, Overloaded
from .engine import Outcome, Work
from .imaging import ImageLimits
from .loading import ModelInfo, ModelLoadError, load_model

__all__ = ["ModelRunner", "Outcome", "Work", "settle_heap"]

_logger = logging.getLogger(__name__)


def settle_heap() -> None:
    """Move everything allocated so far (torch, timm, BentoML: hundreds of thousands of
    objects) out of the garbage collector's sight. Without it a full collection now and then
    walks them all mid-request: one replica's p99 at 16 clients went from ~270 ms to ~50 ms."""
    gc.collect()
    gc.freeze()


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
        self._gate: Gate | None = None
        self._gate_lock = threading.Lock()
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
    def forward_kind(self) -> str:
        """How the forward pass runs ('cuda-graphs', 'torchscript', 'eager'); '' before load."""
        return "" if self._engine is None else str(self._engine.forward_kind)

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
        gate = Path(settings.test_gate) if settings.test_gate else None
        if gate is not None:
            FileGate(gate).hold(lambda: "loading\n")
        try:
            torch.set_num_threads(self.threads)
            with contextlib.suppress(RuntimeError):  # only settable before any parallel work
                torch.set_num_interop_threads(1)
            loaded = load_model(settings.model, device=self.device, dtype=settings.dtype)
            engine = Engine(
                loaded,
                script=settings.torchscript,
                graphs=settings.cuda_graphs,
                max_batch_size=settings.max_batch_size,
                limits=self._limits,
                metrics=self.metrics,
            )
            self.warmup_ms = engine.warmup(settings.max_batch_size)
        except Exception as exc:
            message = str(exc)
            if not isinstance(exc, ModelLoadError):
                message = f"{type(exc).__name__}: {message}"
            self.load_error = message if message.endswith(".") else f"{message}."
            _logger.exception("the model failed to load (VIT_MODEL=%s): %s", settings.model, exc)
            raise
        self._engine = engine
        # On a GPU a batch is prepared on its own thread and stream while the one before runs.
        self._batcher = batcher = MicroBatcher(
            engine.finish if engine.overlaps else engine.run_works,
            prepare=engine.prepare if engine.overlaps else None,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1e3,
            max_queue=settings.max_queue_images,
            on_batch=self._on_batch,
        )
        with self._gate_lock:
            batcher.gate = self._gate if gate is None else FileGate(gate, lambda: batcher.queued)
        info = engine.info
        self.metrics.model_info.labels(
            model=info.name, source=info.source, dtype=info.dtype, device=info.device
        ).set(1)
        _logger.info(
            "ready: %s on %s (%s) warmed up at batch %d in %.0f ms (%d torch threads)",
            info.name,
            info.device,
            engine.forward_kind,
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

    def hold_batches(self, gate: Gate | None) -> None:
        """Tests: call ``gate(batch_size)`` on the model thread before each batch runs (it may
        block; the queue keeps filling)."""
        with self._gate_lock:
            self._gate = gate
            if self._batcher is not None:
                self._batcher.gate = gate

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
            raise overloaded(str(exc), max(1, round(exc.retry_after_s))) from exc
        except Exception as exc:
            _logger.exception("inference failed")
            raise ApiError(500, "inference_failed", "The model failed on this batch.") from exc
        results: list[Outcome | ApiError] = []
        for out, queue_s in done:
            if isinstance(out, Outcome):
                out = Outcome(out.probs, out.attention, out.batch_size, out.inference_ms, queue_s)
            results.append(out)
        return results

    def _on_batch(self, stats: BatchStats) -> None:
        metrics = self.metrics
        metrics.batch_size.observe(stats.size)
        metrics.batch_fill.observe(stats.size / self.settings.max_batch_size)
        for wait in stats.waits_s:
            metrics.observe_stage("queue", wait)
        metrics.queue_depth.set(self.queued)
