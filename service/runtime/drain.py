"""Each process's stop: when the stop signal came, whether the drain delay is over, how much of the
grace period is left; and the stop of a worker whose arbiter died.

What a worker does from the signal on (``service/runtime/server.py`` carries it out):

1. **SIGTERM**: ``/readyz`` answers 503 at once (``draining()``), and every response from now on
   carries ``Connection: close``, so clients reconnect (to another server once the load
   balancer has noticed). Requests are still admitted and answered for ``VIT_DRAIN_DELAY_S``.
   SIGINT (Ctrl-C) skips the delay; a second signal ends the delay early.
2. **Stop admitting**: the listening sockets are swept before they close: connections already
   queued in the kernel are accepted and served rather than reset. Idle connections get a
   short linger, so a request already on its way is still answered (with ``Connection:
   close``) instead of meeting a closed socket.
3. **Answer what was accepted**, then exit, all within ``VIT_GRACE_PERIOD_S`` from the signal.

What uvicorn does alone on SIGTERM: stop listening at once (connections already queued in the
kernel's backlog are reset), close idle keep-alive connections (a request the client is sending
on one at that moment is reset), answer what is in progress, exit; ``/readyz`` never turns 503.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DRAIN", "Drain", "draining", "stop_with_parent"]

_logger = logging.getLogger(__name__)


@dataclass
class Drain:
    """This process's stop, from the signal on."""

    delay_s: float = 5.0
    grace_s: float = 25.0
    header_timeout_s: float = 10.0
    started: float | None = None  # time.monotonic() of the first signal
    delay_over: bool = False
    skip_delay: Callable[[], bool] = lambda: False

    def begin(self, *, delay: bool) -> None:
        """The signal: turn unready now; admit for the drain delay unless ``delay`` is False."""
        if self.started is None:
            self.started = time.monotonic()
            _logger.info(
                "draining: /readyz now 503; admitting requests for %.1f s more, then answering "
                "what was accepted within %.1f s",
                self.delay_s if delay else 0.0,
                self.grace_s,
            )
        if not delay:
            self.delay_over = True

    def delay_elapsed(self) -> bool:
        """Whether the server should stop admitting now."""
        if self.started is None:
            return False
        if not self.delay_over and time.monotonic() - self.started >= self.delay_s:
            self.delay_over = True
        return self.delay_over

    def grace_left(self) -> float:
        """Seconds left of the grace period (all of it before the signal)."""
        if self.started is None:
            return self.grace_s
        return max(0.1, self.grace_s - (time.monotonic() - self.started))


DRAIN = Drain()  # this process's stop


def draining() -> bool:
    """True from the stop signal on: readiness is false."""
    return DRAIN.started is not None


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent() -> bool:
    """A worker: drain, as on SIGTERM, when the arbiter dies (Linux ``PR_SET_PDEATHSIG``).

    BentoML starts each worker in a session of its own, so a SIGKILL of ``bentoml serve`` alone
    (``kill -9``, a supervisor killing one pid) used to leave its workers serving, orphaned, on
    the port (with ``SO_REUSEPORT``, beside the next server started there). Inside a container the
    kernel kills them all anyway. Returns whether the request took (Linux only).

    The kernel sends the parent-death signal each time the thread the worker counts as its
    parent exits: a dying arbiter's threads exit one by one, so it comes several times (tens of
    milliseconds apart, seen here). Sent as SIGTERM, the second would count as "stop now" and cut
    the drain short; so it comes as SIGHUP ("the controlling process died"), and the first one
    becomes a single SIGTERM to this process.
    """
    if sys.platform != "linux":
        return False
    signal.signal(signal.SIGHUP, _parent_died)  # before the prctl: SIGHUP's default kills
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        took = int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
    if took and os.getppid() != parent:  # it died just before the prctl: no signal will come
        _parent_died(signal.SIGHUP, None)
    return took


_PARENT_GONE = False


def _parent_died(_sig: int, _frame: Any) -> None:
    global _PARENT_GONE
    if not _PARENT_GONE:
        _PARENT_GONE = True
        os.kill(os.getpid(), signal.SIGTERM)
