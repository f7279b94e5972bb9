"""Each HTTP worker's uvicorn server: its own listening socket, and the app it serves.

Listening sockets: spread keep-alive connections over the HTTP workers.

BentoML's arbiter binds one TCP socket and hands it to every worker; the workers race to
``accept`` on it, and asyncio accepts up to a backlog's worth of connections per wake-up, so the
first worker to wake takes a whole burst: 16 keep-alive clients against two workers all landed on
one, which served them alone while the other idled. With ``SO_REUSEPORT`` the kernel hashes each
new connection to one of several listening sockets on the same port, so each worker listens on
its own and the connections spread evenly.

Two small patches, both on classes BentoML constructs (``bentoml`` and ``uvicorn`` are pinned):

- in the arbiter, the API socket gets ``SO_REUSEPORT`` and is bound but not listened on: it only
  reserves the port (a bound socket that does not listen receives no connections);
- in each worker, before uvicorn serves, the inherited socket is swapped for a new one bound to
  the same address with ``SO_REUSEPORT`` and listening.

Anything unexpected (no ``SO_REUSEPORT``, a socket that already listens, a Unix socket) leaves
BentoML's behaviour as it was.

The app: ``wrap_app(fn)`` registers a wrapper applied to the ASGI app uvicorn is about to serve
(the service uses it to take its hot routes past BentoML's per-request middleware).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["balance_connections", "running_config", "worker_socket", "wrap_app"]

_logger = logging.getLogger(__name__)
_API_SOCKET = "_bento_api_server"  # bentoml.serving.API_SERVER_NAME
_running: list[Any] = []  # the uvicorn Config this worker serves with
_wrappers: list[Callable[[Any], Any]] = []


def wrap_app(wrapper: Callable[[Any], Any]) -> None:
    """Have each worker serve ``wrapper(app)`` instead of BentoML's ASGI ``app``."""
    _wrappers.append(wrapper)


def running_config() -> Any | None:
    """The ``uvicorn.Config`` this process serves with (its loop and protocol classes), if the
    server was started through the patched ``uvicorn.Server.run``."""
    return _running[0] if _running else None


def balance_connections() -> None:
    """Install both patches (idempotent; call at import of the service module)."""
    import uvicorn
    from circus.sockets import CircusSocket

    if getattr(CircusSocket, "_vit_balanced", False):
        return
    CircusSocket._vit_balanced = True
    if hasattr(socket, "SO_REUSEPORT"):
        bind_and_listen = CircusSocket.bind_and_listen

        def bind_without_listening(self: Any) -> None:
            if self.is_unix or self.name != _API_SOCKET:
                bind_and_listen(self)
                return
            self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.bind((self.host, self.port))

        CircusSocket.bind_and_listen = bind_without_listening

    run = uvicorn.Server.run

    def run_on_own_socket(self: Any, sockets: list[socket.socket] | None = None) -> None:
        _running[:] = [self.config]
        for wrapper in _wrappers:
            self.config.app = wrapper(self.config.app)
        if sockets:
            sockets = [worker_socket(sock, self.config.backlog) for sock in sockets]
        run(self, sockets=sockets)

    uvicorn.Server.run = run_on_own_socket  # type: ignore[method-assign]


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
