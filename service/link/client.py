"""An HTTP worker's end of the hop: one DEALER socket per model process (``split`` topology).

Everything an HTTP worker sends within one event-loop turn travels as one message, to the model
process with the shortest queue as far as the worker knows (``ModelClient.queued``). When a model
process goes away its in-flight requests fail at once with 503 ``not_ready``, and the socket
reconnects by itself when the restarted process binds again (a ``tcp://`` host name is looked up
again at each attempt). ZeroMQ heartbeats find a peer that stopped answering (a frozen process,
a lost node) within the heartbeat timeout, as if it had gone away. Each reply reports the model
process's queue, so the worker's admission refuses at the headers while it is full. The
messages themselves are ``wire.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ..errors import ApiError, not_ready
from ..metrics import Metrics
from ..model.engine import Outcome, Work
from ..model.loading import ModelInfo
from ..runtime.swaps import takes_canary
from . import wire
from .server import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS

__all__ = ["REPORT_TTL_S", "ModelClient"]

_logger = logging.getLogger(__name__)

# How long a model process's reported queue is trusted without a fresher reply (replies come at
# every finished batch while this worker has work in flight; an idle worker's report ages out).
REPORT_TTL_S = 0.25


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


def _estimate(link: _Link, now: float) -> int:
    """The queue of ``link``'s model process as this worker knows it (``ModelClient.queued``)."""
    if now - link.reported_at < REPORT_TTL_S:
        return link.reported + link.sent_since
    return link.inflight_images


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
        self.processes: dict[str, Any] = {}  # each model process's runtime facts, by endpoint
        self.warmup_ms = 0.0
        self.load_error: str | None = None
        self._info: ModelInfo | None = None
        self._canary: ModelInfo | None = None  # a second version the model processes serve
        self._percent = 0  # and its share of the requests
        self._versions: dict[str, ModelInfo] = {}  # every version heard of, for the answers
        self._on_device = False
        self._links: list[_Link] = []
        self._ids = itertools.count()
        self._outbox: list[_Outgoing] = []
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._contexts: list[zmq.asyncio.Context] = []
        self._first_info: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def connect(self) -> None:
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

    async def contact(self, timeout_s: float) -> None:
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

    def route(self, key: str | None = None) -> ModelInfo:
        """The version a request with client ``key`` goes to, by the rule the model processes
        route by (``takes_canary``); ``infer`` sends it along."""
        canary = self._canary
        if canary is not None and takes_canary(key, self._percent):
            return canary
        return self.info

    @property
    def canary(self) -> tuple[ModelInfo, int] | None:
        """The canary version the model processes serve and its percent, if there is one."""
        return None if self._canary is None else (self._canary, self._percent)

    def versions(self) -> set[str]:
        """The versions the model processes serve, as they last said."""
        return {self.info.version} | (set() if self._canary is None else {self._canary.version})

    def repository(self) -> list[dict[str, Any]]:
        """Each version serving, with its percent of the requests."""
        info, canary, percent = self.info, self._canary, self._percent
        rows = [{"name": info.name, "version": info.version, "traffic_percent": 100 - percent}]
        if canary is not None:
            rows.append({"name": info.name, "version": canary.version, "traffic_percent": percent})
        return rows

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
                await link.sock.send(wire.INFO)
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
    async def infer(
        self, works: Sequence[Work], version: str | None = None
    ) -> list[Outcome | ApiError]:
        """Send ``works`` (with whatever else this worker sends this loop turn) and wait;
        ``version``: the one ``route`` chose, sent along while a canary serves."""
        if not works:
            return []
        if version is not None and self._canary is not None:
            works = [dataclasses.replace(work, version=version) for work in works]
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
        frames = wire.encode_request(message_id, works)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        link.pending[message_id] = (reply, time.perf_counter(), len(works))
        link.inflight_images += len(works)
        link.sent_since += len(works)
        try:
            link.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
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
                header = wire.read_header(frames[0].bytes)
                if header.get("op") == "bye":  # the model server is stopping: nothing new
                    link.up = False  # to it; its answers to what was sent still come
                    await link.sock.send(wire.BYE)
                    _logger.info("model process at %s is leaving", link.endpoint)
                elif header.get("op") == "info":
                    self._learn(link, wire.decode_info(header))
                else:
                    buffers = [frame.buffer for frame in frames[1:]]
                    reply = wire.decode_reply(header, buffers, self._versions)
                    self._deliver(link, reply, received)
            except Exception:
                _logger.exception("malformed reply from %s; dropped", link.endpoint)

    def _learn(self, link: _Link, said: wire.Info) -> None:
        if said.info is None:
            self.load_error = said.load_error
        else:
            self._info, self._canary, self._percent = said.info, said.canary, said.percent
            for info in (said.info, said.canary):
                if info is not None:
                    self._versions[info.version] = info
            self.warmup_ms = said.warmup_ms
            self._on_device = said.decodes_on_device
            self.processes[link.endpoint] = said.runtime or {}
        if self._first_info is not None:
            self._first_info.set()

    def _deliver(self, link: _Link, reply: wire.Reply, received: float) -> None:
        entry = link.pending.pop(reply.message_id, None)
        if entry is None:
            return  # its requests were already failed (the link dropped meanwhile)
        future, sent, count = entry
        link.inflight_images = max(0, link.inflight_images - count)
        if reply.queued is not None:
            link.reported, link.reported_at, link.sent_since = reply.queued, received, 0
            link.bound = reply.bound or link.bound
        if reply.error is not None:
            future.set_exception(reply.error)
            return
        self.metrics.observe_stage("transport", max(0.0, received - sent - reply.model_s))
        future.set_result(reply.results)
