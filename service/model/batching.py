"""Fuses concurrent requests into batches for one model worker thread.

Policy (measured against BentoML's adaptive dispatcher, see docs/ARCHITECTURE.md):
- The model runs one batch at a time on a dedicated thread; everything that arrives meanwhile
  queues and goes out together in the next batch, up to ``max_batch_size`` images.
- When the model is idle, a batch leaves at once unless more requests are still being decoded
  (``arriving``); then it waits for them at most ``max_wait_s``. A lone request never waits, and
  nothing is learned from past load, so a burst leaves no lasting delay behind it.
- With a ``prepare`` stage (a GPU model: decode and preprocessing on a stream of their own), a
  batch is taken and prepared on a second thread while the one before it runs: as late as still
  lets its preparation end when the running batch does (both timed on the last batch), or at
  once when a full batch is waiting. The model thread then starts the next batch without waiting
  for its preprocessing, and a batch taken later holds more of what arrived meanwhile.
- The queue is bounded: past ``max_queue`` waiting images, ``submit`` raises ``Overloaded`` at
  once (the HTTP layer answers 503 with Retry-After) instead of letting latency grow unbounded.

Tests hold the model with a gate (``MicroBatcher.gate``; ``FileGate`` for a server in another
process, ``VIT_TEST_GATE``): called on the model thread with each batch before it runs, it may
block, and the queue keeps filling meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["BatchStats", "FileGate", "Gate", "MicroBatcher", "Overloaded"]

_logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

# Called on the model thread with each batch's size before the batch runs; may block (tests).
Gate = Callable[[int], None]


class Overloaded(Exception):
    """The queue is full; retry after ``retry_after_s``."""

    def __init__(self, queued: int, retry_after_s: float) -> None:
        super().__init__(f"{queued} images are already waiting for the model; retry shortly.")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class BatchStats:
    """What one dispatched batch looked like, for metrics."""

    size: int
    waits_s: list[float]  # per item: time from enqueue to the batch starting


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[tuple[Out, float]]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[In, Out]):
    """An asyncio front to a blocking ``run_batch(items) -> outputs`` on one worker thread.

    Args:
        run_batch: Runs a list of items (or, with ``prepare``, what ``prepare`` made of them)
            and returns one output per item, in order.
        prepare: Optional first stage, run on a thread of its own: a list of items -> what
            ``run_batch`` takes. One batch is prepared while the one before it runs.
        max_batch_size: Most items per call of ``run_batch``.
        max_wait_s: Longest an idle model waits for requests still being decoded.
        max_queue: Most items waiting; more raise ``Overloaded``.
        on_batch: Called (on the event loop) with each batch's stats.
    """

    def __init__(
        self,
        run_batch: Callable[[Any], Sequence[Out]],
        *,
        prepare: Callable[[list[In]], Any] | None = None,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < max_batch_size or max_wait_s < 0:
            raise ValueError(
                "need max_batch_size >= 1, max_queue >= max_batch_size and max_wait_s >= 0"
            )
        self._run_batch = run_batch
        self._prepare = prepare
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Pending[In, Out]] = deque()
        self._arriving = 0
        self._held = 0  # requests submitted and not yet answered
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vit-model")
        self._preparer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vit-prepare")
            if prepare is not None
            else None
        )
        self._running: asyncio.Task[None] | None = None  # with ``prepare``: the batch running
        self._run_since = 0.0  # when the batch running started on the model thread
        self._last_run_s = 0.0  # the last batch's time on the model thread
        self._last_prepare_s = 0.0  # and its preparation's
        self.gate: Gate | None = None

    def on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread (and the preparing thread, with ``prepare``) before
        any batch, and wait (blocking; not on the event loop): the threads are started and
        ``fn`` warms them for the first request (ready means warm)."""
        if self._preparer is not None:
            self._preparer.submit(fn).result()
        return self._executor.submit(fn).result()

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    @contextmanager
    def arriving(self, count: int = 1) -> Iterator[None]:
        """Announce requests that are being decoded and will submit shortly."""
        self._arriving += count
        try:
            yield
        finally:
            self._arriving -= count
            self._notify()

    async def submit(self, items: Sequence[In]) -> list[tuple[Out, float]]:
        """Queue items (one request's images) and wait for (output, queue seconds) of each."""
        if not items:
            return []
        self._ensure_started()
        if len(self._queue) + len(items) > self.max_queue:
            batches_ahead = len(self._queue) / self.max_batch_size + 1
            raise Overloaded(len(self._queue), max(1.0, batches_ahead * self._last_run_s))
        loop = asyncio.get_running_loop()
        pending = [_Pending[In, Out](item, loop.create_future()) for item in items]
        self._queue.extend(pending)
        self._notify()
        self._held += 1
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        finally:
            self._held -= 1

    async def drain(self, poll_s: float = 0.002) -> None:
        """Return once every request submitted so far has its answer (new ones may still come:
        stop sending them first)."""
        while self._held:
            await asyncio.sleep(poll_s)

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="vit-batcher")

    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            running = self._running
            if running is not None and not running.done():
                await self._until_due(running)
            else:
                await self._gather_more()
            batch = [
                self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))
            ]
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            if self._preparer is None:
                await self._run_one(batch, [p.item for p in batch], time.perf_counter())
                continue
            started = time.perf_counter()
            try:
                prepared = await self._prepare_one(batch)
                if prepared is None:
                    continue
                if self._running is not None:
                    await self._running  # the model thread is free once the batch before is
            except asyncio.CancelledError:  # closing: this batch's callers are cancelled too
                self._cancel(batch)
                raise
            self._running = asyncio.ensure_future(self._run_one(batch, prepared, started))

    async def _prepare_one(self, batch: list[_Pending[In, Out]]) -> Any | None:
        """``prepare`` on its own thread; None (and each caller failed) when it raised."""
        started = time.perf_counter()
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._preparer, self._prepare_batch, [p.item for p in batch]
            )
        except Exception as exc:
            self._fail(batch, exc)
            return None
        self._last_prepare_s = time.perf_counter() - started
        return prepared

    async def _run_one(self, batch: list[_Pending[In, Out]], work: Any, started: float) -> None:
        """Run one batch on the model thread and hand each caller its output."""
        self._run_since = ran = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, work
            )
        except asyncio.CancelledError:  # closing: its callers are cancelled too
            self._cancel(batch)
            raise
        except Exception as exc:  # the batch failed as a whole: each caller gets the error
            self._fail(batch, exc)
            return
        self._last_run_s = time.perf_counter() - ran
        waits = [started - p.enqueued for p in batch]
        for p, out, wait in zip(batch, outputs, waits, strict=True):
            if not p.future.done():
                p.future.set_result((out, wait))
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), waits))

    @staticmethod
    def _cancel(batch: list[_Pending[In, Out]]) -> None:
        for p in batch:
            p.future.cancel()

    @staticmethod
    def _fail(batch: list[_Pending[In, Out]], exc: Exception) -> None:
        _logger.error("batch of %d failed", len(batch), exc_info=exc)
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    def _run(self, work: Any) -> Sequence[Out]:
        gate = self.gate
        if gate is not None and self._preparer is None:
            gate(len(work))
        return self._run_batch(work)

    def _prepare_batch(self, items: list[In]) -> Any:
        gate = self.gate
        if gate is not None:
            gate(len(items))
        assert self._prepare is not None
        return self._prepare(items)

    async def _until_due(self, running: asyncio.Task[None]) -> None:
        """With a batch running: wait until the next one is due to be prepared (so that its
        preparation ends as the running batch does), a full batch waits, or the model is free."""
        assert self._wakeup is not None
        due = self._run_since + self._last_run_s - self._last_prepare_s
        while not running.done() and len(self._queue) < self.max_batch_size:
            remaining = due - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            woken = asyncio.ensure_future(self._wakeup.wait())
            try:
                await asyncio.wait({running, woken}, timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                woken.cancel()

    async def _gather_more(self) -> None:
        """Wait (bounded) for requests still decoding, if the batch has room for them."""
        assert self._wakeup is not None
        if self.max_wait_s <= 0:
            return
        deadline = self._queue[0].enqueued + self.max_wait_s
        while self._arriving > 0 and len(self._queue) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def aclose(self) -> None:
        """Stop the loop; queued callers get CancelledError."""
        for task in (self._task, self._running):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        for p in self._queue:
            p.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._preparer is not None:
            self._preparer.shutdown(wait=False, cancel_futures=True)


class FileGate:
    """A gate a test in another process holds with a file (``VIT_TEST_GATE``): while ``path``
    exists, the model waits (polling every few milliseconds), and the file says what waits:
    ``loading``, or ``held=N queued=M`` (the batch held and the images queued behind it).
    Deleting the file releases it; a gate whose file is gone lets everything through.

    Args:
        path: the file.
        queued: how many images are queued now.
    """

    POLL_S = 0.005

    def __init__(self, path: Path, queued: Callable[[], int] = lambda: 0) -> None:
        self.path = path
        self.queued = queued

    def hold(self, say: Callable[[], str]) -> None:
        """Wait while the file exists, writing ``say()`` into it whenever that changes."""
        said = None
        while True:
            try:  # never create the file: once the test deletes it, nothing holds
                fd = os.open(self.path, os.O_WRONLY)
            except FileNotFoundError:
                return
            try:
                now = say()
                if now != said:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, now.encode(), 0)
                    said = now
            finally:
                os.close(fd)
            time.sleep(self.POLL_S)

    def __call__(self, size: int) -> None:
        self.hold(lambda: f"held={size} queued={self.queued()}\n")
