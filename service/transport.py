"""Batches between HTTP worker processes and model processes, over ZeroMQ (``split`` topology).

Why ZeroMQ and not BentoML's own hop (``bentoml.depends`` calls): measured on 2 cores, one
``depends`` call per request served 547 requests/s with 289 failed (aiohttp disconnects), and
front-side batching over it 1,052; the same batching over a ZeroMQ ``ipc://`` socket served
1,280 with a 1.06 ms p50 (docs/ARCHITECTURE.md, *Split topology*). LitServe and vLLM use the same
library for the same job. BentoML still runs the processes (the model service is a dependency of
the HTTP service), builds and containerizes them; only the pixels travel here.

Wire format (no pickle: a message from the network is data, never code). Each message is
multipart: a JSON header, then one frame per buffer.

- HTTP worker -> model: ``{"id", "items": [{"mode", "shape": [h, w, 3]} | {"mode", "jpeg": 1}]}``,
  then per item its uint8 HWC pixels or its JPEG bytes. ``{"op": "info"}`` asks for metadata.
- model -> HTTP worker: ``{"id", "model_s", "queued", "bound", "items": [{"batch", "ms",
  "queue_s", "att": [r, c] or null} | {"error": {...}}]}``, then per answered item its float32
  probabilities and, when ``att`` is set, its float32 attention map. A whole message can fail:
  ``{"id", "queued", "bound", "error"}`` (e.g. 503 ``overloaded``: the queue bound is counted
  here, across all HTTP workers). ``queued`` is the model process's queue (images waiting, from
  every HTTP worker) as the reply leaves and ``bound`` its ``VIT_MAX_QUEUE_IMAGES``: each HTTP
  worker refuses at the headers while that report, plus what it sent since, is at the bound
  (``ModelClient.queue_full``), so a full model is not also sent every doomed request's pixels
  to refuse.

Everything an HTTP worker sends within one event-loop turn travels as one message, to the
model process with the shortest queue as far as the worker knows (``ModelClient.queued``). A
model process binds only once warmed up; when one goes away its in-flight requests fail at once
with 503 ``not_ready`` and the socket reconnects by itself when the restarted process binds
again (a ``tcp://`` host name is looked up again at each attempt). ZeroMQ heartbeats find a
peer that stopped answering (a frozen process, a lost node) within ``HEARTBEAT_TIMEOUT_MS``, as
if it had gone away.

A model process run on its own (``VIT_MODEL_BIND``) that is stopping sends ``{"op": "bye"}`` to
each HTTP worker; the worker sends it nothing new from then on (its requests go to the other
model processes), answers ``{"op": "bye"}`` after everything it sent before, and the model
process closes once every worker has answered and nothing is in flight: a model server scaled
away loses no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .errors import ApiError
from .inference import ModelRunner, Outcome, Work, load_failed, not_ready
from .loading import ModelInfo
from .metrics import Metrics
from .topology import run_folder

__all__ = ["ModelClient", "ModelServer", "ipc_endpoint", "model_info_from_dict"]


_logger = logging.getLogger(__name__)

# A peer that answers none of our pings for this long is treated as gone (ZMTP heartbeats,
# answered by ZeroMQ's I/O thread, so a model process busy with a batch still answers them).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
# How long a model process's reported queue is trusted without a fresher reply (replies come at
# every finished batch while this worker has work in flight; an idle worker's report ages out).
REPORT_TTL_S = 0.25
_BYE = orjson.dumps({"op": "bye"})


def ipc_endpoint(index: int, run_id: int | None = None) -> str:
    """The private socket of model process ``index`` of this server."""
    return f"ipc://{run_folder(run_id)}/model-{index}.sock"


def model_info_from_dict(data: dict[str, Any]) -> ModelInfo:
    """Rebuild ``ModelInfo`` from its JSON form (lists back to tuples)."""
    values: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in data.items()
        if key in ModelInfo.__dataclass_fields__
    }
    return ModelInfo(**values)


def _error_dict(exc: ApiError) -> dict[str, Any]:
    return {"status": exc.status, "code": exc.code, "message": exc.message, "headers": exc.headers}


def _error_from(data: dict[str, Any]) -> ApiError:
    return ApiError(data["status"], data["code"], data["message"], data.get("headers"))


# --- the model process -----------------------------------------------------------------------
class ModelServer:
    """Serves one ``ModelRunner`` on a ROUTER socket, in a thread with its own event loop."""

    def __init__(
        self,
        runner: ModelRunner,
        endpoint: str,
        runtime: dict[str, Any],
        on_load_failure: Callable[[str], bool] | None = None,
    ) -> None:
        self.runner = runner
        self.endpoint = endpoint
        self.runtime = runtime
        self.on_load_failure = on_load_failure
        self.peers = 0  # HTTP workers connected now
        self._tasks: set[asyncio.Task[None]] = set()
        self._senders: set[bytes] = set()  # identities of the HTTP workers heard from
        self._leaving = False
        self._farewells: set[bytes] = set()  # told "bye", not yet answered
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: zmq.asyncio.Socket | None = None

    def start(self) -> threading.Thread:
        """Load the model, then listen (binding only once warmed up)."""
        thread = threading.Thread(target=self._main, name="vit-model-server", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Close the socket and stop the loop (from any thread)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def leave(self) -> None:
        """Tell every HTTP worker to send nothing new (from any thread): at a stop of a model
        server run on its own, whose HTTP workers stay up and turn to the other ones."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._say_bye)

    async def idle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until no HTTP worker is connected, or (after ``leave``)
        every one has answered the farewell, and nothing is in flight: at a stop, the HTTP
        workers drain first and need this process meanwhile."""
        deadline = time.monotonic() + timeout_s
        while (self.peers > 0 and not (self._leaving and not self._farewells)) or self._tasks:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _main(self) -> None:
        try:
            self.runner.load()
        except Exception:
            # Logged by the runner. Serve the error to the HTTP workers unless the failure
            # handler ends the server.
            error = self.runner.load_error
            if error is not None and self.on_load_failure and not self.on_load_failure(error):
                return
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        context = zmq.asyncio.Context()
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self._sock = sock
        monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        sock.bind(self.endpoint)
        _logger.info("model process listening on %s", self.endpoint)
        loops = [
            asyncio.ensure_future(self._receive(sock)),
            asyncio.ensure_future(self._count_peers(monitor)),
        ]
        await self._stop.wait()
        for task in loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.runner.aclose()
        context.destroy(linger=0)

    async def _count_peers(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_ACCEPTED:
                self.peers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.peers = max(0, self.peers - 1)

    def _say_bye(self) -> None:
        for identity in self._senders:
            self._bye(identity)
        self._leaving = True  # only now: ``idle`` (another thread) waits for those told
        _logger.info("leaving: %d HTTP worker(s) told to send nothing new", len(self._farewells))

    def _bye(self, identity: bytes) -> None:
        assert self._sock is not None
        # Mandatory for this send only: to a worker gone it fails instead of being dropped
        # silently (replies to a worker gone are still dropped: it failed them itself).
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            self._sock.send_multipart([identity, _BYE], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return  # that worker is gone: nothing to wait for
        finally:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._farewells.add(identity)

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            if len(frames) == 2 and frames[1].bytes == _BYE:  # this worker will send nothing more
                self._farewells.discard(identity)
                continue
            if identity not in self._senders:
                self._senders.add(identity)
                if self._leaving:  # a worker that connected while this process is leaving
                    self._bye(identity)
            task = asyncio.ensure_future(self._handle(sock, frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, sock: zmq.asyncio.Socket, frames: list[zmq.Frame]) -> None:
        started = time.perf_counter()
        identity, head, *buffers = frames
        try:
            header = orjson.loads(head.bytes)
            if self.runner.load_error is not None:  # VIT_ON_LOAD_FAILURE=serve
                error = load_failed(self.runner.load_error)
                failed: dict[str, Any] = {"op": "info", "load_error": error.message}
                if header.get("op") != "info":
                    failed = {"id": header["id"], "error": _error_dict(error)}
                await sock.send_multipart([identity.bytes, orjson.dumps(failed)])
                return
            if header.get("op") == "info":
                reply = {
                    "op": "info",
                    "info": asdict(self.runner.info),
                    "warmup_ms": self.runner.warmup_ms,
                    "decodes_on_device": self.runner.decodes_on_device,
                    "runtime": self.runtime,
                }
                await sock.send_multipart([identity.bytes, orjson.dumps(reply)])
                return
            works = [
                _work(item, buffer) for item, buffer in zip(header["items"], buffers, strict=True)
            ]
        except Exception:
            _logger.exception("malformed message from an HTTP worker; dropped")
            return
        out_frames: list[Any] = []
        items: list[dict[str, Any]] = []
        try:
            results = await self.runner.infer(works)
        except ApiError as exc:
            reply = {"id": header["id"], **self._queue_report(), "error": _error_dict(exc)}
            await sock.send_multipart([identity.bytes, orjson.dumps(reply)])
            return
        for result in results:
            if isinstance(result, ApiError):
                items.append({"error": _error_dict(result)})
                continue
            att = None if result.attention is None else list(result.attention.shape)
            items.append(
                {
                    "batch": result.batch_size,
                    "ms": result.inference_ms,
                    "q": result.queue_s,
                    "att": att,
                }
            )
            out_frames.append(np.ascontiguousarray(result.probs, dtype=np.float32))
            if result.attention is not None:
                out_frames.append(np.ascontiguousarray(result.attention, dtype=np.float32))
        reply = {
            "id": header["id"],
            "items": items,
            "model_s": time.perf_counter() - started,
            **self._queue_report(),
        }
        await sock.send_multipart([identity.bytes, orjson.dumps(reply), *out_frames], copy=False)

    def _queue_report(self) -> dict[str, int]:
        """What every reply says of the queue, for the HTTP workers' admission."""
        return {"queued": self.runner.queued, "bound": self.runner.settings.max_queue_images}


def _estimate(link: _Link, now: float) -> int:
    """The queue of ``link``'s model process as this worker knows it (``ModelClient.queued``)."""
    if now - link.reported_at < REPORT_TTL_S:
        return link.reported + link.sent_since
    return link.inflight_images


def _work(item: dict[str, Any], buffer: zmq.Frame) -> Work:
    if item.get("jpeg"):
        return Work(mode=item["mode"], jpeg=buffer.bytes)
    pixels = np.frombuffer(buffer.buffer, dtype=np.uint8).reshape(item["shape"])
    return Work(mode=item["mode"], pixels=pixels)


# --- the HTTP worker -------------------------------------------------------------------------
@dataclass
class _Link:
    """One model process as an HTTP worker sees it."""

    endpoint: str
    sock: zmq.asyncio.Socket
    up: bool = False
    inflight_images: int = 0
    reported: int = 0  # the model process's queue, as its last reply to this worker said
    reported_at: float = -math.inf  # when that reply came (time.perf_counter)
    sent_since: int = 0  # images this worker sent it after that reply
    bound: int | None = None  # its queue bound, once a reply has said it
    pending: dict[int, tuple[asyncio.Future[Any], float, int]] = field(default_factory=dict)


@dataclass
class _Outgoing:
    works: Sequence[Work]
    future: asyncio.Future[list[Outcome | ApiError]]


class ModelClient:
    """An HTTP worker's connection to the model processes; ``infer`` like ``ModelRunner``.

    Args:
        endpoints: One ZeroMQ endpoint per model process.
        metrics: This worker's metrics.
        need_all: Ready only when every model process is (this server's own processes);
            False: when any one is (model servers elsewhere, some of them scaled away or
            restarting: the others serve meanwhile).
        queue_bound: This worker's ``VIT_MAX_QUEUE_IMAGES``, for admission until a model
            process has reported its own (a model server run on its own may differ).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        metrics: Metrics,
        need_all: bool = True,
        *,
        queue_bound: int,
    ) -> None:
        self.endpoints = list(endpoints)
        self.metrics = metrics
        self.need_all = need_all
        self.queue_bound = queue_bound
        self.runtime: dict[str, Any] = {}
        self.warmup_ms = 0.0
        self.load_error: str | None = None
        self._info: ModelInfo | None = None
        self._on_device = False
        self._links: list[_Link] = []
        self._ids = itertools.count()
        self._outbox: list[_Outgoing] = []
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._contexts: list[zmq.asyncio.Context] = []
        self._first_info: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to every model process (call on the serving event loop; idempotent)."""
        if self._contexts:
            return
        self._first_info = asyncio.Event()
        for endpoint in self.endpoints:
            # A context (an I/O thread) per model process: ZeroMQ looks a tcp:// host name up
            # in its I/O thread, blocking it, so a slow lookup for one endpoint (a model pod
            # scaled away, a DNS outage) must not stall the traffic to the others.
            context = zmq.asyncio.Context()
            self._contexts.append(context)
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to live connections
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            )
            sock.connect(endpoint)
            link = _Link(endpoint, sock)
            self._links.append(link)
            self._tasks.append(asyncio.ensure_future(self._watch(link, monitor)))
            self._tasks.append(asyncio.ensure_future(self._receive(link)))

    async def aclose(self) -> None:
        """Stop the loops and close the sockets."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for link in self._links:
            self._fail(link, not_ready("The server is shutting down."))
        for context in self._contexts:
            context.destroy(linger=0)  # closes the sockets and their monitors

    async def first_contact(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until this worker has heard from a model process once.

        A freshly (re)started HTTP worker takes connections a moment before its sockets have
        reached the model processes; its first requests wait for that instead of being told
        ``not_ready`` while the model is up. A model process lost later fails fast instead.
        """
        if self._first_info is None or self._first_info.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_info.wait(), timeout_s)

    @property
    def ready(self) -> bool:
        """Every model process (any one, unless ``need_all``) is warmed up (it binds only
        then) and answered ``info``."""
        every = all if self.need_all else any
        return self._info is not None and every(link.up for link in self._links)

    @property
    def info(self) -> ModelInfo:
        """The model's metadata, as the model process reported it."""
        if self.load_error is not None:
            raise ApiError(503, "load_failed", self.load_error)
        if self._info is None or not any(link.up for link in self._links):
            raise not_ready("No model process is reachable yet; retry shortly.")
        return self._info

    @property
    def decodes_on_device(self) -> bool:
        """Whether the model processes decode JPEGs on their device."""
        return self._on_device

    @property
    def queued(self) -> int:
        """Images waiting in the model process this worker sends to next, as far as it knows:
        its last reported queue (every worker's images) plus what this worker sent it since,
        while that report is under ``REPORT_TTL_S`` old; after that, only this worker's own
        images in flight (a lower bound: the next request goes through and its reply brings
        a fresh report). With several model processes, the least loaded one's."""
        live = [link for link in self._links if link.up]
        if not live:
            return sum(link.inflight_images for link in self._links)
        now = time.perf_counter()
        return min(_estimate(link, now) for link in live)

    @property
    def queue_full(self) -> bool:
        """Whether every live model process's queue is at its bound as far as this worker
        knows (``queued``; the bound as the model process reported it, this worker's own
        ``queue_bound`` until then): admission refuses at the headers."""
        live = [link for link in self._links if link.up]
        now = time.perf_counter()
        return bool(live) and all(
            _estimate(link, now) >= (link.bound or self.queue_bound) for link in live
        )

    def arriving(self, count: int) -> contextlib.AbstractContextManager[None]:
        """No-op: batches form in the model process from whatever has arrived."""
        return contextlib.nullcontext()

    async def _watch(self, link: _Link, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.up = True
                await link.sock.send(orjson.dumps({"op": "info"}))
            elif event == zmq.EVENT_DISCONNECTED:
                was_up, link.up = link.up, False
                if was_up:
                    _logger.warning("model process at %s went away", link.endpoint)
                self._fail(link, not_ready("The model process restarted; retry shortly."))

    def _fail(self, link: _Link, error: ApiError) -> None:
        for future, _sent, _count in link.pending.values():
            if not future.done():
                future.set_exception(error)
        link.pending.clear()
        link.inflight_images = 0
        link.reported, link.reported_at, link.sent_since = 0, -math.inf, 0

    # --- requests --------------------------------------------------------------------------
    async def infer(self, works: Sequence[Work]) -> list[Outcome | ApiError]:
        """Send ``works`` (with whatever else this worker sends this loop turn) and wait."""
        if not works:
            return []
        if self.load_error is not None:
            raise ApiError(503, "load_failed", self.load_error)
        if not any(link.up for link in self._links):
            raise not_ready("No model process is reachable; retry shortly.")
        loop = asyncio.get_running_loop()
        outgoing = _Outgoing(works, loop.create_future())
        self._outbox.append(outgoing)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await outgoing.future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._outbox = self._outbox, []
        live = [link for link in self._links if link.up]
        if not live:
            for out in batch:
                if not out.future.done():
                    out.future.set_exception(not_ready("No model process is reachable."))
            return
        now = time.perf_counter()
        link = min(live, key=lambda each: (_estimate(each, now), each.inflight_images))
        works = [work for out in batch for work in out.works]
        message_id = next(self._ids)
        items: list[dict[str, Any]] = []
        frames: list[Any] = []
        for work in works:
            if work.jpeg is not None:
                items.append({"mode": work.mode, "jpeg": 1})
                frames.append(work.jpeg)
            else:
                assert work.pixels is not None
                items.append({"mode": work.mode, "shape": list(work.pixels.shape)})
                frames.append(np.ascontiguousarray(work.pixels))
        header = orjson.dumps({"id": message_id, "items": items})
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        link.pending[message_id] = (reply, time.perf_counter(), len(works))
        link.inflight_images += len(works)
        link.sent_since += len(works)
        try:
            link.sock.send_multipart([header, *frames], copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            link.pending.pop(message_id, None)
            link.inflight_images -= len(works)
            link.sent_since -= len(works)
            reply.set_exception(not_ready(f"The model process is unreachable ({exc})."))
        reply.add_done_callback(lambda done: self._split(done, batch))

    @staticmethod
    def _split(done: asyncio.Future[Any], batch: list[_Outgoing]) -> None:
        """Hand each request its slice of the message's results."""
        if done.exception() is not None:
            for out in batch:
                if not out.future.done():
                    out.future.set_exception(done.exception())  # type: ignore[arg-type]
            return
        results: list[Outcome | ApiError] = done.result()
        start = 0
        for out in batch:
            end = start + len(out.works)
            if not out.future.done():
                out.future.set_result(results[start:end])
            start = end

    async def _receive(self, link: _Link) -> None:
        while True:
            frames = await link.sock.recv_multipart(copy=False)
            received = time.perf_counter()
            try:
                header = orjson.loads(frames[0].bytes)
                if header.get("op") == "bye":  # the model server is stopping: nothing new
                    link.up = False  # to it; its answers to what was sent still come
                    await link.sock.send(_BYE)
                    _logger.info("model process at %s is leaving", link.endpoint)
                    continue
                if header.get("op") == "info" and "load_error" in header:
                    self.load_error = header["load_error"]
                    if self._first_info is not None:
                        self._first_info.set()
                    continue
                if header.get("op") == "info":
                    self._info = model_info_from_dict(header["info"])
                    self.warmup_ms = header["warmup_ms"]
                    self._on_device = header["decodes_on_device"]
                    self.runtime[link.endpoint] = header["runtime"]
                    if self._first_info is not None:
                        self._first_info.set()
                    continue
                self._deliver(link, header, frames[1:], received)
            except Exception:
                _logger.exception("malformed reply from %s; dropped", link.endpoint)

    def _deliver(
        self, link: _Link, header: dict[str, Any], buffers: list[zmq.Frame], received: float
    ) -> None:
        entry = link.pending.pop(header["id"], None)
        if entry is None:
            return  # its requests were already failed (the link dropped meanwhile)
        future, sent, count = entry
        link.inflight_images = max(0, link.inflight_images - count)
        if "queued" in header:
            link.reported, link.reported_at, link.sent_since = header["queued"], received, 0
            link.bound = header.get("bound", link.bound)
        if "error" in header:
            future.set_exception(_error_from(header["error"]))
            return
        self.metrics.observe_stage("transport", max(0.0, received - sent - header["model_s"]))
        results: list[Outcome | ApiError] = []
        frames = iter(buffers)
        for item in header["items"]:
            if "error" in item:
                results.append(_error_from(item["error"]))
                continue
            probs = np.frombuffer(next(frames).buffer, dtype=np.float32)
            attention = None
            if item["att"] is not None:
                attention = np.frombuffer(next(frames).buffer, dtype=np.float32).reshape(
                    item["att"]
                )
            results.append(Outcome(probs, attention, item["batch"], item["ms"], item["q"]))
        future.set_result(results)
