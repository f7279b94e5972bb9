"""One model on one device, loaded, warmed up and fed shared batches.

``ModelRunner`` owns the ``Engine`` (the model on its device) and the ``MicroBatcher`` that fuses
the images of concurrent requests into the engine's batches. It takes ``Work`` (an image already
decoded by Pillow, or a JPEG to decode on the device) and gives back one ``Outcome`` or
``ApiError`` per image. It runs inside each HTTP worker (``replicas``: ``service/backend.py``'s
local backend) or alone in a model process behind ``service/link/server.py`` (``split``); either
way it writes the batch-side metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ApiError, load_failed, not_ready, overloaded
from ..metrics import Metrics
from ..runtime.settings import Settings
from ..runtime.swaps import Served, Serving, takes_canary
from .batching import BatchStats, FileGate, Gate, MicroBatcher, Overloaded
from .engine import Outcome, Work
from .imaging import ImageLimits
from .loading import ModelInfo, ModelLoadError, load_model

__all__ = ["ModelRunner", "Outcome", "Work", "release_memory", "settle_heap"]

_logger = logging.getLogger(__name__)

# The CPU priority of a version loading beside the one serving (19: the lowest).
LOAD_NICENESS = 19


def settle_heap() -> None:
    """Move everything allocated so far (torch, timm, BentoML: hundreds of thousands of
    objects) out of the garbage collector's sight. Without it a full collection now and then
    walks them all mid-request: one replica's p99 at 16 clients went from ~270 ms to ~50 ms."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Give a dropped model's memory back (its engine closed, so reference counting freed it):
    the young objects collected, the C heap's free pages returned to the system (glibc keeps
    them otherwise, and RSS would not fall) and CUDA's cached blocks released. No full
    collection: it would walk the whole frozen heap with the GIL held, mid-traffic."""
    gc.collect(1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def _load_message(exc: Exception) -> str:
    """What a failed load says: a ModelLoadError's own words, else the exception's kind too."""
    message = str(exc)
    if not isinstance(exc, ModelLoadError):
        message = f"{type(exc).__name__}: {message}"
    return message if message.endswith(".") else f"{message}."


# Per device in this process: the batch running now. Several models (VIT_MODELS), or two
# versions, on one device take turns: a batch runs with all the process's intra-op threads, and
# the other model's requests gather into its next batch meanwhile, rather than two half batches
# competing for the same cores.
_TURNS: dict[str, threading.Lock] = {}
_TURNS_LOCK = threading.Lock()


def _turn(device: str) -> threading.Lock:
    with _TURNS_LOCK:
        return _TURNS.setdefault(device, threading.Lock())


# A version in service: its engine and its batcher.
_Version = tuple[Any, MicroBatcher[Work, Any]]


def _warm_threads(version: _Version) -> None:
    """Start a version's batch threads and run each attention mode on them, the batcher's own
    path, unrecorded (``Engine.warm_thread``): ready means warm. The first batch on a fresh
    thread took ~1.7 ms more than the next (the digits model); not on a GPU, whose threads
    its graphs' capture and the overlap warm-up use (and which this machine cannot test)."""
    engine, batcher = version
    if not engine.overlaps:
        batcher.on_model_thread(engine.warm_thread)


class ModelRunner:
    """One model on one device, with its batcher; ``infer`` is safe to call from the event loop.

    Args:
        settings: batching limits, model source, dtype.
        metrics: where the batch-side figures go.
        device: 'cpu', 'cuda:N' or 'auto'.
        threads: torch intra-op threads for this process.
        name: the name it is served under (``VIT_MODELS``; '': its checkpoint's own).
    """

    def __init__(
        self, settings: Settings, metrics: Metrics, *, device: str, threads: int, name: str = ""
    ) -> None:
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.device = device
        self.threads = threads
        self.warmup_ms = 0.0
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._engine: Any = None
        self._next: _Version | None = None  # a prepared version
        self._canary: _Version | None = None  # a second version serving a share
        self.canary_percent = 0
        self.on_change: Callable[[], None] | None = None  # the versions serving changed
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

    def load(self, served: Served | None = None) -> None:
        """Load, warm up and open for traffic (blocking; run it off the event loop).

        Args:
            served: what to serve (default: ``VIT_MODEL`` as version 1): a version, maybe a
                canary beside it, under the served name (default: the runner's ``name``, else
                the model's own).
        """
        if served is None:
            served = Served(Serving("1", self.settings.model), name=self.name)
        elif not served.name:
            served = dataclasses.replace(served, name=self.name)
        settings = self.settings
        gate = Path(settings.test_gate) if settings.test_gate else None
        if gate is not None:
            FileGate(gate).hold(lambda: "loading\n")
        torch.set_num_threads(self.threads)
        with contextlib.suppress(RuntimeError):  # only settable before any parallel work
            torch.set_num_interop_threads(1)
        try:
            stable = served.stable
            self._engine, self._batcher = self._build(stable.source, stable.version, served.name)
            _warm_threads((self._engine, self._batcher))
            if served.canary is not None:
                canary = served.canary
                fresh = self._build(canary.source, canary.version, served.name)
                _warm_threads(fresh)
                self._serve(fresh, served.percent)
        except Exception as exc:
            self.load_error = _load_message(exc)
            _logger.exception("the model failed to load (VIT_MODEL=%s): %s", settings.model, exc)
            raise
        self._publish(self._engine.info, 1)
        device_decode = ("device_decode",) if self.decodes_on_device else ()
        self.metrics.prepare(stages=("queue", "preprocess", "forward", "attention", *device_decode))
        settle_heap()
        self._ready.set()

    def _build(
        self, source: str, version: str, name: str = ""
    ) -> tuple[Any, MicroBatcher[Work, Any]]:
        """A warmed-up engine for ``source`` (named as the served model, once there is one)
        and its batcher, the test gate on it; nothing of this runner changes."""
        from .engine import Engine

        settings = self.settings
        loaded = load_model(source, device=self.device, dtype=settings.dtype)
        if not name:
            name = loaded.info.name if self._engine is None else self._engine.info.name
        loaded.info = dataclasses.replace(loaded.info, name=name, version=version)
        engine = Engine(
            loaded,
            script=settings.torchscript,
            graphs=settings.cuda_graphs,
            max_batch_size=settings.max_batch_size,
            limits=self._limits,
            metrics=self.metrics,
        )
        warmup_ms = engine.warmup(settings.max_batch_size)
        # On a GPU a batch is prepared on its own thread and stream while the one before runs.
        run = engine.finish if engine.overlaps else engine.run_works
        turn = _turn(engine.info.device)

        def run_batch(batch: Any) -> Any:
            with turn:
                return run(batch)

        batcher: MicroBatcher[Work, Any] = MicroBatcher(
            run_batch,
            prepare=engine.prepare if engine.overlaps else None,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1e3,
            max_queue=settings.max_queue_images,
            on_batch=self._on_batch,
        )
        gate = Path(settings.test_gate) if settings.test_gate else None
        with self._gate_lock:
            batcher.gate = self._gate if gate is None else FileGate(gate, lambda: batcher.queued)
        self.warmup_ms = warmup_ms
        _logger.info(
            "ready: %s version %s from %s on %s (%s) warmed up at batch %d in %.0f ms "
            "(%d torch threads)",
            name,
            version,
            source,
            engine.info.device,
            engine.forward_kind,
            settings.max_batch_size,
            warmup_ms,
            torch.get_num_threads(),
        )
        return engine, batcher

    # --- versions (``service/runtime/swaps.py``'s Follower) -----------------------------------
    def versions(self) -> set[str]:
        """The versions serving now: one, or a stable one and a canary."""
        if self._engine is None:
            return set()
        canary = self._canary
        return {self._engine.info.version} | (set() if canary is None else {canary[0].info.version})

    @property
    def canary(self) -> tuple[ModelInfo, int] | None:
        """The canary version and its percent of the traffic, if there is one."""
        canary = self._canary
        return None if canary is None else (canary[0].info, self.canary_percent)

    def prepare_version(self, source: str, version: str) -> None:
        """Load and warm ``source`` as ``version`` beside what serves, which keeps serving
        (blocking; off the event loop). ``switch`` then puts it in service.

        Raises:
            ModelLoadError (or what loading raised): what serves is untouched.
        """
        self.drop()
        self._next = self._build(source, version)

    async def prepare(self, source: str, version: str) -> None:
        """``prepare_version`` on a thread of its own at the lowest CPU priority (and the
        torch threads it starts inherit it), so the version serving keeps its cores: loading
        and warming a model beside serving traffic would otherwise take them for seconds."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def work() -> None:
            with contextlib.suppress(OSError, AttributeError):  # Linux: nice is per thread
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)
            try:
                self.prepare_version(source, version)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, done, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, None)

        threading.Thread(target=work, name="vit-load-version", daemon=True).start()
        await done
        # Its batch threads start from a thread at normal priority, not from the one at nice
        # 19 (a thread inherits its creator's niceness, and taking it back needs privilege).
        prepared = self._next
        if prepared is not None:
            await asyncio.to_thread(_warm_threads, prepared)

    def drop(self) -> None:
        """Forget a prepared version that will not serve (a load aborted elsewhere)."""
        prepared, self._next = self._next, None
        if prepared is not None:
            prepared[0].close()
        del prepared
        release_memory()

    async def switch(self, percent: int = 100) -> float:
        """Put the prepared version in service at once: alone (``percent`` 100; the versions
        serving are retired) or as the canary taking ``percent`` of the requests (replacing a
        canary there was). Every request from now on is routed among the versions serving;
        a retired one answers what it holds, then its memory is freed. Returns the seconds
        that took."""
        assert self._next is not None, "no prepared version"
        fresh, self._next = self._next, None
        retired = self._serve(fresh, percent)
        self._changed()
        return await self._retire(retired)

    def _serve(self, fresh: _Version, percent: int) -> list[_Version]:
        """Route to ``fresh`` from now on: alone (``percent`` 100) or as the canary; the
        versions that no longer serve."""
        retired: list[_Version] = []
        if percent >= 100:
            retired.append(self._stable())
            self._engine, self._batcher = fresh
        else:
            self.canary_percent = percent
        if self._canary is not None:
            retired.append(self._canary)
        self._canary = None if percent >= 100 else fresh
        self._publish(fresh[0].info, 1)
        return retired

    async def traffic(self, percent: int) -> float:
        """Give the canary ``percent`` of the requests: 100 promotes it (the stable version
        is retired), 0 retires it. Returns the seconds the retired version took to finish."""
        canary = self._canary
        if canary is None:
            return 0.0
        retired: list[_Version] = []
        if percent >= 100:
            retired.append(self._stable())
            self._engine, self._batcher = canary
            self._canary = None
        elif percent <= 0:
            retired.append(canary)
            self._canary = None
        else:
            self.canary_percent = percent
        self._changed()
        return await self._retire(retired)

    def _changed(self) -> None:
        """The versions serving changed: tell ``on_change`` (before any answer from them)."""
        if self.on_change is not None:
            self.on_change()

    async def _retire(self, retired: list[_Version]) -> float:
        """Each version in ``retired`` answers what it holds; then its memory is freed."""
        started = time.perf_counter()
        for engine, batcher in retired:
            self._publish(engine.info, 0)
            await batcher.drain()
            await batcher.aclose()
            engine.close()
        retired.clear()
        release_memory()
        return time.perf_counter() - started

    def _stable(self) -> _Version:
        assert self._batcher is not None, "not loaded"
        return self._engine, self._batcher

    def _route(self, key: str | None) -> _Version:
        """The version a request goes to: the canary for its share of requests (by the
        client's key when it sends one, so a client stays with one version; else at random)."""
        canary = self._canary
        if canary is not None and takes_canary(key, self.canary_percent):
            return canary
        return self._stable()

    def route(self, key: str | None = None) -> ModelInfo:
        """The version a request with client ``key`` would go to (``infer`` takes it)."""
        if self._engine is None:
            raise self._not_ready()
        info: ModelInfo = self._route(key)[0].info
        return info

    def start_loading(
        self,
        on_ready: Callable[[], None] | None = None,
        on_failure: Callable[[str], object] | None = None,
        served: Served | None = None,
    ) -> threading.Thread:
        """Load in the background so liveness answers while a large model loads (``served``:
        as ``load`` takes it)."""
        thread = threading.Thread(
            target=self._load_quietly,
            args=(on_ready, on_failure, served),
            name="vit-load",
            daemon=True,
        )
        thread.start()
        return thread

    @property
    def settled(self) -> bool:
        """Loading is over: ready, or failed."""
        return self.ready or self.load_error is not None

    def _load_quietly(
        self,
        on_ready: Callable[[], None] | None,
        on_failure: Callable[[str], object] | None,
        served: Served | None,
    ) -> None:
        # A failure is logged and kept in load_error; readiness stays false.
        try:
            self.load(served)
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

    async def infer(
        self, works: Sequence[Work], version: str | None = None
    ) -> list[Outcome | ApiError]:
        """Run ``works`` in the shared batches; one Outcome (or per-image ApiError) each;
        ``version``: the one ``route`` chose (default: routed here).

        Raises:
            ApiError: 503 ``not_ready`` before warm-up, 503 ``overloaded`` (with Retry-After)
                when the queue is full, 500 ``inference_failed`` when the batch failed.
        """
        if not self.ready or self._batcher is None:
            raise self._not_ready()
        engine, batcher = self._route(None)
        if version is not None:  # the version ``route`` chose, if it still serves
            for held in (self._canary, self._stable()):
                if held is not None and held[0].info.version == version:
                    engine, batcher = held
        info = engine.info  # the version this request rides
        try:
            done = await batcher.submit(works)
        except Overloaded as exc:
            raise overloaded(str(exc), max(1, round(exc.retry_after_s))) from exc
        except Exception as exc:
            _logger.exception("inference failed")
            raise ApiError(500, "inference_failed", "The model failed on this batch.") from exc
        results: list[Outcome | ApiError] = []
        for out, queue_s in done:
            if isinstance(out, Outcome):
                out = Outcome(
                    out.probs, out.attention, out.batch_size, out.inference_ms, queue_s, info
                )
            results.append(out)
        return results

    def _publish(self, info: ModelInfo, value: int) -> None:
        self.metrics.model_info.labels(
            model=info.name,
            version=info.version,
            source=info.source,
            dtype=info.dtype,
            device=info.device,
        ).set(value)

    def _on_batch(self, stats: BatchStats) -> None:
        metrics = self.metrics
        metrics.batch_size.observe(stats.size)
        metrics.batch_fill.observe(stats.size / self.settings.max_batch_size)
        for wait in stats.waits_s:
            metrics.observe_stage("queue", wait)
        metrics.queue_depth.set(self.queued)
