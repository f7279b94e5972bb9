"""The one seam between ViT Serve and the servers it runs in: uvicorn (each worker's HTTP server),
BentoML's arbiter (circus) and BentoML's HTTP traffic metrics.

``install`` is called once, by the composition root. It replaces three attributes of
third-party modules and nothing else (``tests/unit/test_seam.py`` lists them, and fails when
one more appears or a pinned release no longer has the hook):

1. ``uvicorn.Server`` -> ``WorkerServer``. BentoML's worker script serves with
   ``uvicorn.Server(config).run(sockets=[socket])`` and has no other way in. The subclass gives
   each worker its own listening socket, serves the front door's app with ``WorkerProtocol``
   (uvicorn's ``Config`` takes the protocol as a class), and drains on SIGTERM.
2. ``bentoml._internal.utils.circus.create_standalone_arbiter`` -> ``_arbiter``. In the arbiter
   (the ``bentoml serve`` process): its workers are restarted in containers too, its API socket
   only reserves the port, and the server's run folder is claimed.
3. ``bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware`` -> a subclass
   whose path labels are bounded and that counts scrapes of ``/metrics``.

Each worker (``WorkerServer``, ``WorkerProtocol``):

- **Its own listening socket.** BentoML's arbiter binds one TCP socket and hands it to every
  worker; the workers race to ``accept`` on it, and asyncio accepts up to a backlog's worth of
  connections per wake-up, so the first worker to wake takes a whole burst (16 keep-alive
  clients against two workers all landed on one). Here the arbiter's socket, with
  ``SO_REUSEPORT``, is bound but never listens (it only reserves the port), and each worker
  listens on a socket of its own bound to the same address: the kernel spreads new connections.
- **The admission gate.** As soon as a request's headers are parsed, the front door may answer
  it with pre-rendered bytes (``Front.gate``): the app never runs, the body is skipped and the
  connection kept. Refusals in a row on one connection are paced (``refusal_delay``): the
  first is answered at once, each next one after a growing wait (a timer, no CPU), so a client
  that resends the moment it is refused, ignoring ``Retry-After``, costs a refusal per wait
  instead of one per round trip; an admitted request resets the pace.
- **Drain** (``service/runtime/drain.py``): on SIGTERM, unready at once and ``Connection:
  close`` on every answer; after the drain delay, the listeners are swept (connections queued
  in the kernel are served, not reset) and closed, idle connections linger briefly, and what was
  accepted is answered within the grace period. A worker whose arbiter dies drains too.
- **Header deadline.** A connection must deliver each request's headers within
  ``VIT_HEADER_TIMEOUT_S`` (from its first byte, or from the connection's start), else a 408
  in our shape and it is closed: uvicorn alone restarts its keep-alive timer on every byte, so a
  slowloris connection is kept forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from bentoml._internal.server.http import instruments
from bentoml._internal.utils import circus as bento_circus
from circus.sockets import CircusSocket
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from .drain import DRAIN, stop_with_parent
from .runfolder import claim_run_folder, failure_reported
from .settings import Settings

__all__ = [
    "UNMATCHED_PATH",
    "Front",
    "WorkerProtocol",
    "WorkerServer",
    "accept_queue",
    "install",
    "refusal_delay",
    "replaced",
    "serving_runtime",
    "worker_socket",
]

_logger = logging.getLogger(__name__)

# How long an idle connection stays open once the server stops admitting: a request already
# sent on it (crossing our close on the wire) arrives within this and is still answered.
LINGER_S = 0.5
# Refusals paced per connection (``refusal_delay``): the second in a row waits PACE_FIRST_S,
# each next one twice as long, up to PACE_MAX_S.
PACE_FIRST_S = 0.05
PACE_MAX_S = 0.3
UNMATCHED_PATH = "/(unmatched)"
_API_SOCKET = "_bento_api_server"  # bentoml's API_SERVER_NAME
_ORIGINAL_PATH = "vit.original_path"


class Front(Protocol):
    """What the integration asks of the HTTP side (``service/web/routes.py``)."""

    def wrap(self, app: Any) -> Any:
        """The ASGI app a worker serves, around BentoML's ``app``."""

    def gate(self, method: bytes, url: bytes, scope: dict[str, Any]) -> bytes | None:
        """A whole answer to send right after the headers, or None to let the request in (the
        gate may mark its ``scope``, which the app then sees)."""

    def header_timeout(self, seconds: float) -> bytes:
        """Count a connection closed for slow headers; the 408's bytes."""

    def path_label(self, path: str) -> str | None:
        """The traffic label of ``path``: itself, its route's template (a bounded set), or
        None for a path no route serves."""

    async def close_doors(self, grace_s: float) -> None:
        """The stop: close the front doors that are not HTTP (gRPC), answering what they
        accepted within ``grace_s``; runs beside the HTTP side's own drain."""


@dataclass
class _Installed:
    front: Front
    header_timeout_s: float
    config: Any = None  # the uvicorn Config this worker serves with, once serving
    host: str | None = None  # the address this worker's HTTP socket listens on, once serving


_INSTALLED: list[_Installed] = []
_ORIGINALS: dict[str, Any] = {}


def install(settings: Settings, front: Front) -> None:
    """Hand the servers our classes (idempotent: a second call only changes the front)."""
    DRAIN.delay_s, DRAIN.grace_s = settings.drain_delay_s, settings.grace_period_s
    DRAIN.skip_delay = failure_reported
    _INSTALLED[:] = [_Installed(front, settings.header_timeout_s)]
    if _ORIGINALS:
        return
    _ORIGINALS["uvicorn.Server"] = uvicorn.Server
    _ORIGINALS["create_standalone_arbiter"] = bento_circus.create_standalone_arbiter
    _ORIGINALS["RunnerTrafficMetricsMiddleware"] = instruments.RunnerTrafficMetricsMiddleware
    uvicorn.Server = WorkerServer  # type: ignore[misc]
    bento_circus.create_standalone_arbiter = _arbiter
    instruments.RunnerTrafficMetricsMiddleware = _bounded_traffic_metrics(  # type: ignore[misc]
        _ORIGINALS["RunnerTrafficMetricsMiddleware"]
    )


def replaced() -> dict[str, str]:
    """What ``install`` replaced, by its dotted name: the seam's reason for each."""
    return {
        "uvicorn.Server": "each worker's own socket, the front door's app and protocol, drain",
        "bentoml._internal.utils.circus.create_standalone_arbiter": (
            "respawn in containers, the API socket only reserves the port, the run folder"
        ),
        "bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware": (
            "bounded path labels, scrapes counted"
        ),
    }


def listening_host() -> str | None:
    """The address this worker's HTTP socket is bound to (None outside a served worker): the
    other front doors (gRPC) listen there too."""
    return _INSTALLED[0].host if _INSTALLED else None


def serving_runtime() -> dict[str, Any]:
    """The event loop, HTTP parser and accept queue this process really runs (asked, not
    assumed)."""
    loop = type(asyncio.get_running_loop())
    config = _INSTALLED[0].config if _INSTALLED else None
    protocol = getattr(config, "http_protocol_class", None)
    if isinstance(protocol, type) and issubclass(protocol, HttpToolsProtocol):
        protocol = HttpToolsProtocol  # ours only adds to uvicorn's httptools protocol
    backlog = getattr(config, "backlog", None)
    return {
        "event_loop": f"{loop.__module__}.{loop.__qualname__}",
        "http_protocol": "unknown"
        if protocol is None
        else f"{protocol.__module__}.{protocol.__qualname__}",
        "listen_backlog": None if backlog is None else accept_queue(backlog),
        "tcp_migrate_req": migrates_queued_connections(),
    }


def migrates_queued_connections() -> bool | None:
    """Whether the kernel hands the connections queued on a closing listener to the other
    listeners of its ``SO_REUSEPORT`` group (``net.ipv4.tcp_migrate_req``, Linux 5.14+; per
    network namespace); None where unknown.

    Each worker listens on a socket of its own: when one dies (a crash, an OOM kill), the
    connections the kernel had queued for it but it had not accepted yet are reset unless this
    is on, and a client that reconnects the moment its connection to the dying worker broke
    can be queued there in the moment before the socket closes (measured: 1 run in 4 of
    ``test_a_dying_http_worker_loses_only_its_own_in_flight_requests`` lost such a request;
    none of 5 with it on)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"
    except (OSError, ValueError):
        return None


def accept_queue(backlog: int) -> int:
    """The accept queue a socket listening with ``backlog`` really gets: the kernel caps it at
    ``net.core.somaxconn`` (4096 on Linux 5.4 and later, 128 before; set per network namespace,
    so per container or pod)."""
    try:
        cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return backlog
    return min(backlog, cap)


# --- each worker's server ------------------------------------------------------------------
class WorkerServer(uvicorn.Server):
    """A worker's uvicorn server: its own socket, the front door's app, our protocol, drain."""

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        installed = _INSTALLED[0]
        installed.config = config = self.config
        stop_with_parent()
        config.http = WorkerProtocol
        config.app = installed.front.wrap(config.app)
        if sockets:
            sockets = [worker_socket(sock, config.backlog) for sock in sockets]
            address = sockets[0].getsockname()
            installed.host = address[0] if isinstance(address, tuple) else None
        queue = accept_queue(config.backlog)
        if queue < config.backlog:
            # A burst of new connections past the accept queue has its SYNs dropped, and the
            # clients retry them after 1, 3 and 7 s: the steps of an overload test's long tail.
            _logger.warning(
                "the accept queue is %d connections, not the %d asked: net.core.somaxconn caps it; "
                "raise it (sysctl net.core.somaxconn=%d; a pod's securityContext.sysctls) so a "
                "burst of new connections is not retried after 1, 3 and 7 s",
                queue,
                config.backlog,
                config.backlog,
            )
        super().run(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler: only flags here; the server's tick acts on them.
        first = DRAIN.started is None and not self.should_exit
        delay = first and sig == signal.SIGTERM and DRAIN.delay_s > 0
        DRAIN.begin(delay=delay and not DRAIN.skip_delay())
        self._stop_signal = sig
        if DRAIN.delay_elapsed():
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if DRAIN.started is not None and not self.should_exit and DRAIN.delay_elapsed():
            super().handle_exit(getattr(self, "_stop_signal", signal.SIGTERM), None)
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop admitting: the other front doors (gRPC) start closing, each listener is swept
        (what the kernel queued is served) and closed in the same loop turn; once the other
        doors answered their calls in flight, uvicorn's own shutdown, within what is left of
        the grace period."""
        DRAIN.begin(delay=False)
        self.config.timeout_graceful_shutdown = DRAIN.grace_left()  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        doors = loop.create_task(_INSTALLED[0].front.close_doors(DRAIN.grace_left()))
        protocol: Any = self.config.http_protocol_class
        factory = functools.partial(
            protocol,
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        queued: list[socket.socket] = []
        for server in self.servers:
            for listener in server.sockets:
                queued.extend(_accept_queued(listener))
            server.close()  # right after the sweep: nothing new can queue in between
        for conn in queued:
            with contextlib.suppress(OSError):
                await loop.connect_accepted_socket(factory, conn)
        if queued:
            _logger.info("served %d connection(s) still queued at stop", len(queued))
        # The other doors' calls in flight are answered first (HTTP requests in flight go on
        # meanwhile): uvicorn's shutdown ends with the lifespan's, which closes the model.
        await doors
        self.config.timeout_graceful_shutdown = DRAIN.grace_left()  # type: ignore[assignment]
        await super().shutdown(sockets)


def worker_socket(inherited: socket.socket, backlog: int) -> socket.socket:
    """This worker's own listening socket on the inherited socket's address, when the arbiter
    left that socket bound with ``SO_REUSEPORT`` and not listening; else ``inherited``."""
    try:
        if inherited.family not in (socket.AF_INET, socket.AF_INET6) or not hasattr(
            socket, "SO_REUSEPORT"
        ):
            return inherited
        reuse = inherited.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        listening = inherited.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if not reuse or listening:
            return inherited
        own = socket.socket(inherited.family, socket.SOCK_STREAM)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(inherited.getsockname())
        own.listen(backlog)
        own.set_inheritable(False)
    except OSError as exc:
        _logger.warning("keeping the shared listening socket (%s)", exc)
        return inherited
    inherited.close()
    return own


def _accept_queued(listener: Any) -> list[socket.socket]:
    """Accept every connection the kernel has queued on ``listener`` (non-blocking)."""
    accepted: list[socket.socket] = []
    try:
        sock = socket.socket(fileno=os.dup(listener.fileno()))
    except OSError:
        return accepted
    try:
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # nothing more queued (BlockingIOError), or the socket is gone
                break
            conn.setblocking(False)
            accepted.append(conn)
    finally:
        sock.close()
    return accepted


# --- each connection -------------------------------------------------------------------------
class _NoEvent:
    """The message event of an answered request: nothing waits on it."""

    def set(self) -> None:
        pass


class _Answered:
    """Stands in for uvicorn's request/response cycle of a request the gate answered. Nothing
    changes it once answered (uvicorn skips the body of a complete response), so two serve
    every such request: keep-alive or not (``_ANSWERED``)."""

    response_complete = True
    disconnected = False
    more_body = False
    body = b""
    message_event = _NoEvent()

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive


_ANSWERED = {True: _Answered(True), False: _Answered(False)}


def refusal_delay(in_a_row: int) -> float:
    """How long the ``in_a_row``-th refusal in a row on one connection waits before it is
    written: 0 for the first, then PACE_FIRST_S doubling up to PACE_MAX_S."""
    if in_a_row <= 1:
        return 0.0
    return min(PACE_MAX_S, PACE_FIRST_S * 2 ** (in_a_row - 2))


class WorkerProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the gate (and its pace), the header deadline and the
    drain."""

    _header_timer: asyncio.TimerHandle | None = None
    _refusals = 0  # refusals in a row on this connection
    _paced: asyncio.TimerHandle | None = None  # a refusal waiting for its turn
    _paced_answer = b""
    _addressed = False  # ``server`` and ``client`` looked up (``_address``)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn's own, less its two address look-ups (getsockname, getpeername), which wait
        # for the first request the gate lets through (``_address``). Each is a system call
        # that gives the GIL up, and beside a busy decode or model thread taking it back waits
        # up to a switch interval (5 ms): at the start of a 5x overload, 1,024 new connections,
        # each refused, held the event loop for seconds (5x p99 1.4-3 s, all of it requests on
        # new connections). ``tests/unit/test_seam.py`` checks this sets what uvicorn's sets.
        self.connections.add(self)
        self.transport = transport
        self.flow = FlowControl(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        self._arm()  # a connection that never sends a byte is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._paced is not None:
            self._paced.cancel()
            self._paced = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        if self._paced is not None:  # a request pipelined behind a paced refusal: in order
            self._send_paced()
        if self._idle() and self._gated():
            return
        self._refusals = 0
        self._address()
        super().on_headers_complete()
        if DRAIN.started is not None and self.cycle is not None:
            self.cycle.keep_alive = False  # uvicorn then answers with Connection: close

    def shutdown(self) -> None:
        if self._paced is not None:
            self._send_paced()
        if not self._idle():
            self.cycle.keep_alive = False
            return
        self.loop.call_later(LINGER_S, self._close_if_idle)

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _gated(self) -> bool:
        if self.parser.should_upgrade():
            return False
        scope: Any = self.scope
        answer = _INSTALLED[0].front.gate(self.parser.get_method(), self.url, scope)
        if answer is None:
            return False
        keep_alive = (
            self.parser.get_http_version() == "1.1"
            and self.parser.should_keep_alive()
            and DRAIN.started is None
        )
        self.cycle = _ANSWERED[keep_alive]  # type: ignore[assignment]
        if not keep_alive:  # mark the answer as the connection's last
            head, _, body = answer.partition(b"\r\n\r\n")
            self.transport.write(head + b"\r\nconnection: close\r\n\r\n" + body)
            self.on_response_complete()
            self.loop.call_later(LINGER_S, self._close_if_idle)  # let the body arrive first
            return True
        self._refusals += 1
        delay = refusal_delay(self._refusals)
        if delay == 0.0:
            self.transport.write(answer)
            self.on_response_complete()
            return True
        # Read nothing more meanwhile: whatever comes next on this connection is answered
        # after this refusal, in order.
        self.flow.pause_reading()
        self._paced_answer = answer
        self._paced = self.loop.call_later(delay, self._send_paced)
        return True

    def _address(self) -> None:
        """This connection's two addresses, looked up once, into the request's scope."""
        if not self._addressed:
            self._addressed = True
            self.server = get_local_addr(self.transport)
            self.client = get_remote_addr(self.transport)
        scope: Any = self.scope
        scope["server"] = self.server
        scope["client"] = self.client

    def _send_paced(self) -> None:
        """Write the paced refusal now (its time has come, or order or a stop demands it)."""
        if self._paced is None:
            return
        self._paced.cancel()
        self._paced = None
        if self.transport.is_closing():
            return
        self.transport.write(self._paced_answer)
        self.on_response_complete()  # reads again, and arms the keep-alive timer

    def _arm(self) -> None:
        self._disarm()
        timeout_s = _INSTALLED[0].header_timeout_s
        self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._idle():
            return
        installed = _INSTALLED[0]
        with contextlib.suppress(Exception):  # counting must not keep the connection open
            self.transport.write(installed.front.header_timeout(installed.header_timeout_s))
        self.transport.close()

    def _close_if_idle(self) -> None:
        if self._idle() and not self.transport.is_closing():
            self.transport.close()


# --- the arbiter -----------------------------------------------------------------------------
class _PortReservation(CircusSocket):
    """The API socket as the arbiter holds it: bound with ``SO_REUSEPORT``, never listening (a
    bound socket that does not listen receives no connections); each worker listens on a socket
    of its own on the same address (``worker_socket``). Not circus' own ``so_reuseport``
    option: circus then leaves the socket unbound and binds one per process only for watchers
    it configured itself."""

    def bind_and_listen(self) -> None:
        self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.bind((self.host, self.port))


def _arbiter(watchers: list[Any], **kwargs: Any) -> Any:
    """BentoML's arbiter, with what the server needs of it:

    - every watcher respawns its processes, in a container too: BentoML leaves restarts to the
      orchestrator there (``BENTOML_CONTAINERIZED``), but the orchestrator sees only the
      container, which stays up: a dead replica would silently halve capacity and a dead model
      process would leave every request 503 for good;
    - the API socket only reserves the port (``_PortReservation``), where the platform has
      ``SO_REUSEPORT``;
    - the run folder is claimed (empty at start, removed at exit).
    """
    claim_run_folder()
    for watcher in watchers:
        watcher.respawn = True
    if hasattr(socket, "SO_REUSEPORT"):
        kwargs["sockets"] = [_reserved(sock) for sock in kwargs.get("sockets", [])]
    return _ORIGINALS["create_standalone_arbiter"](watchers, **kwargs)


def _reserved(sock: CircusSocket) -> CircusSocket:
    if sock.name != _API_SOCKET or sock.is_unix:
        return sock
    reservation = _PortReservation(
        name=sock.name,
        host=sock.host,
        port=sock.port,
        family=sock.family,
        backlog=sock.backlog,
    )
    sock.close()
    return reservation


# --- BentoML's traffic metrics ---------------------------------------------------------------
def _bounded_traffic_metrics(base: Any) -> Any:
    """BentoML's traffic middleware, labelling paths that are no route with a constant.

    The original labels every request with its raw path and stores one series per label set in
    the multiprocess files, so a scan of random URLs grows them (and the time to render
    /metrics) without bound. The subclass shows it ``UNMATCHED_PATH`` instead of an unknown
    path, while the request itself travels on with its real path (and still gets its 404). It
    also counts scrapes of ``/metrics``, which the original leaves out.
    """

    class _RestorePath:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            original = scope.get(_ORIGINAL_PATH)
            if original is not None:
                scope = {**scope, "path": original}
            await self.app(scope, receive, send)

    class BoundedTrafficMetricsMiddleware(base):
        def __init__(self, app: Any, **options: Any) -> None:
            super().__init__(_RestorePath(app), **options)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/metrics":
                await self._count_scrape(scope, receive, send)
                return
            if scope["type"].startswith("http"):
                path = scope["path"]
                label = _INSTALLED[0].front.path_label(path) if _INSTALLED else None
                if label != path:
                    scope = {**scope, "path": label or UNMATCHED_PATH, _ORIGINAL_PATH: path}
            await super().__call__(scope, receive, send)

        async def _count_scrape(self, scope: Any, receive: Any, send: Any) -> None:
            from bentoml._internal.context import server_context

            if not self._is_setup:
                self._setup()
            started, status = time.perf_counter(), [0]

            async def noting(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, receive, noting)
            labels = {
                "endpoint": "/metrics",
                "service_name": server_context.bento_name,
                "service_version": server_context.bento_version,
                "http_response_code": status[0],
                "runner_name": server_context.service_name,
            }
            self.metrics_request_total.labels(**labels).inc()
            self.metrics_request_duration.labels(**labels).observe(time.perf_counter() - started)

    return BoundedTrafficMetricsMiddleware
