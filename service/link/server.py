"""The model process's end of the hop: a ROUTER socket that feeds every HTTP worker's images into
one ``ModelRunner`` and answers each message (``split`` topology).

It binds only once the model is warmed up, so an HTTP worker's connection is its readiness
signal; a model that failed to load binds anyway, to hand the error to the HTTP workers
(``VIT_ON_LOAD_FAILURE=serve``). A model server run on its own (``VIT_MODEL_BIND``) that is
stopping says ``bye`` to each HTTP worker: the worker sends it nothing new, answers ``bye`` after
what it had sent (same pipe, so in order), and the server closes once every worker has answered
and nothing is in flight: a model server scaled away loses no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ..errors import ApiError, load_failed
from ..model.runner import ModelRunner, Outcome, Work
from ..runtime.swaps import POLL_S as SWAP_POLL_S
from ..runtime.swaps import SwapBoard
from . import wire

__all__ = ["HEARTBEAT_IVL_MS", "HEARTBEAT_TIMEOUT_MS", "ModelServer"]

_logger = logging.getLogger(__name__)

# A peer that answers none of our pings for this long is treated as gone (ZMTP heartbeats,
# answered by ZeroMQ's I/O thread, so a model process busy with a batch still answers them).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


class ModelServer:
    """Serves one ``ModelRunner`` on a ROUTER socket, in a thread with its own event loop.

    Args:
        runner: the model.
        endpoint: where to listen (``ipc://`` beside the HTTP workers, or ``tcp://``).
        runtime: facts about this process for ``GET /model``.
        on_load_failure: called with the error when the model cannot load; returns whether to
            serve the error (else the thread ends: the server is being stopped).
        on_bind_failure: called with the error when the endpoint cannot be bound (nothing can
            be served: the server should stop).
        swaps: the server's swap board (this server's own model processes): the model loads
            what it says is served, and follows its changes; ``index``: this process's.
    """

    def __init__(
        self,
        runner: ModelRunner,
        endpoint: str,
        runtime: dict[str, Any],
        on_load_failure: Callable[[str], bool] | None = None,
        on_bind_failure: Callable[[str], object] | None = None,
        swaps: SwapBoard | None = None,
        index: int = 0,
    ) -> None:
        self.runner = runner
        self.swaps = swaps
        self.index = index
        runner.on_change = self._announce
        self.endpoint = endpoint
        self.runtime = runtime
        self.on_load_failure = on_load_failure
        self.on_bind_failure = on_bind_failure
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
            self.runner.load(None if self.swaps is None else self.swaps.served())
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
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            error = f"the model process cannot listen on {self.endpoint}: {exc}."
            _logger.error("%s", error)
            context.destroy(linger=0)
            if self.on_bind_failure is not None:
                self.on_bind_failure(error)
            return
        _logger.info("model process listening on %s", self.endpoint)
        loops = [
            asyncio.ensure_future(self._receive(sock)),
            asyncio.ensure_future(self._count_peers(monitor)),
        ]
        if self.swaps is not None and self.runner.load_error is None:
            loops.append(asyncio.ensure_future(self._follow(self.swaps)))
        await self._stop.wait()
        for task in loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.runner.aclose()
        context.destroy(linger=0)

    async def _follow(self, board: SwapBoard) -> None:
        """Act on the server's model changes (``service/runtime/swaps.py``)."""
        while True:
            try:
                await board.follow(self.index, self.runner)
            except Exception:
                _logger.exception("following a model change failed")
            await asyncio.sleep(SWAP_POLL_S)

    def _announce(self) -> None:
        """The versions serving changed: tell every HTTP worker heard from, now, before any
        answer from a new version leaves (ZeroMQ keeps each peer's order)."""
        if self._sock is None:
            return
        info = self._info()
        for identity in self._senders:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart([identity, info], flags=zmq.NOBLOCK)

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
            self._sock.send_multipart([identity, wire.BYE], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return  # that worker is gone: nothing to wait for
        finally:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._farewells.add(identity)

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            if len(frames) == 2 and frames[1].bytes == wire.BYE:  # that worker sends no more
                self._farewells.discard(identity)
                continue
            if identity not in self._senders:
                self._senders.add(identity)
                if self._leaving:  # a worker that connected while this process is leaving
                    self._bye(identity)
            task = asyncio.ensure_future(self._handle(sock, identity, frames[1:]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, sock: zmq.asyncio.Socket, identity: bytes, frames: list[Any]) -> None:
        started = time.perf_counter()
        runner = self.runner
        try:
            header = wire.read_header(frames[0].bytes)
            if header.get("op") == "info":
                await sock.send_multipart([identity, self._info()])
                return
            if runner.load_error is not None:  # VIT_ON_LOAD_FAILURE=serve
                error = load_failed(runner.load_error)
                failed = wire.encode_failure(header["id"], error, **self._queue_report())
                await sock.send_multipart([identity, failed])
                return
            works = wire.decode_request(header, [frame.buffer for frame in frames[1:]])
        except Exception:
            _logger.exception("malformed message from an HTTP worker; dropped")
            return
        try:
            results = await self._infer(works)
        except ApiError as exc:
            failed = wire.encode_failure(header["id"], exc, **self._queue_report())
            await sock.send_multipart([identity, failed])
            return
        reply = wire.encode_reply(
            header["id"],
            results,
            model_s=time.perf_counter() - started,
            **self._queue_report(),
        )
        await sock.send_multipart([identity, *reply], copy=False)

    async def _infer(self, works: list[Work]) -> list[Outcome | ApiError]:
        """Each work by the version its HTTP worker routed it to (one call per version)."""
        versions = {work.version for work in works}
        if len(versions) == 1:
            return await self.runner.infer(works, versions.pop())
        groups: dict[str | None, list[int]] = {}
        for index, work in enumerate(works):
            groups.setdefault(work.version, []).append(index)
        answers = await asyncio.gather(
            *(self.runner.infer([works[i] for i in idx], v) for v, idx in groups.items())
        )
        results: list[Outcome | ApiError] = [None] * len(works)  # type: ignore[list-item]
        for idx, answer in zip(groups.values(), answers, strict=True):
            for i, result in zip(idx, answer, strict=True):
                results[i] = result
        return results

    def _info(self) -> bytes:
        runner = self.runner
        if runner.load_error is not None:
            return wire.encode_load_error(load_failed(runner.load_error).message)
        return wire.encode_info(
            runner.info,
            warmup_ms=runner.warmup_ms,
            decodes_on_device=runner.decodes_on_device,
            runtime={**self.runtime, "forward": runner.forward_kind},
            canary=runner.canary,
        )

    def _queue_report(self) -> dict[str, int]:
        """What every reply says of the queue, for the HTTP workers' admission."""
        return {"queued": self.runner.queued, "bound": self.runner.settings.max_queue_images}
