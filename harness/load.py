"""The project's one HTTP load client: open loop (requests leave on a schedule, whatever the server
does) or closed loop (each client sends its next request once it has an answer). The benchmarks
(``loadtests/bench.py`` where wrk is missing), the open-loop CLI (``loadtests/openloop.py``), the
overload drill, the soak and the tests all drive servers with it.

A closed-loop client (wrk, a locust user) sends its next request only once it has an answer, so
a server that slows down slows its own load and its queueing never shows ("coordinated
omission"). Here arrivals are scheduled at ``rate`` (Poisson or evenly spaced) and each goes out
on an idle keep-alive connection from a pool; when every connection is busy and
``max_connections`` are open, the arrival is dropped by the generator and counted as such.

HTTP/1.1 keep-alive on asyncio protocols (uvloop where installed), one request in flight per
connection, answers parsed here (``Content-Length``, chunked, or read to EOF; ``Connection:
close`` honoured). No HTTP client library on the hot path: one Python process pushes thousands
of requests/s (``--ceiling`` measures how many on the machine at hand).

Every scheduled request ends in exactly one bucket, per ``kind``:

- ``dropped``: no idle connection and ``max_connections`` already open (the generator's limit);
- ``connect_errors``: the connection it needed could not be opened (refused, timed out);
- ``sent``, then exactly one of: ``answered`` (by status and the JSON body's ``error.code`` for
  non-2xx answers), ``resets`` (written, then the connection was closed or reset before a whole
  answer came: accepted-and-reset), ``timeouts``, ``protocol_errors`` (an answer that is not
  HTTP/1.x).

Latency runs from the moment the generator handled the arrival (a new connection's connect
included) to the last byte of the answer. How late the generator handled arrivals against their
schedule is reported apart (``send_lag``), with the dispatch rate it achieved and the CPU it
used, so a run can tell whether the generator kept up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

__all__ = [
    "NO_ERROR_BODY",
    "Request",
    "Result",
    "run_closed_loop",
    "run_loop",
    "run_open_loop",
]

T = TypeVar("T")

NO_ERROR_BODY = "-"
"""The error code recorded for a non-2xx answer whose body has no JSON ``error.code``."""

# uvicorn closes a keep-alive connection after 5 s idle; reusing one idle for longer races its
# close and shows up as a reset that the server did not cause.
_KEEPALIVE_IDLE_S = 4.0
# Timers have millisecond resolution, and uvloop returns from a shorter sleep at once: a busy
# loop that would take a core from the server under test. Sleep at least this long, then send
# everything that has come due.
_MIN_SLEEP_S = 0.001
# Arrivals handled this much after their scheduled time count as late sends.
_LATE_S = 0.005
_MAX_HEAD_BYTES = 65536


@dataclass(frozen=True)
class Request:
    """One prepared request: ``kind`` labels it in the counts, ``weight`` is its share."""

    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    weight: float = 1.0

    def wire(self, host: str) -> bytes:
        """The bytes on the wire: request line, headers (Host and Content-Length added), body."""
        names = {name.lower() for name, _ in self.headers}
        lines = [f"{self.method} {self.path} HTTP/1.1"]
        if "host" not in names:
            lines.append(f"Host: {host}")
        lines += [f"{name}: {value}" for name, value in self.headers]
        if "content-length" not in names and (self.body or self.method in _BODY_METHODS):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass
class Result:
    """What one run saw: every scheduled request in exactly one bucket, per kind."""

    mode: Literal["open", "closed"]
    target_rate: float | None = None
    duration_s: float = 0.0
    """The load window: arrivals scheduled (open loop) or clients sending (closed loop)."""
    elapsed_s: float = 0.0
    """The window plus waiting for the last answers."""
    dispatch_window_s: float = 0.0
    """From the start to the last arrival handled (past ``duration_s`` if the generator lagged)."""
    scheduled: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    connect_errors: Counter[str] = field(default_factory=Counter)
    answered: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    """(kind, status, error code) -> answers; the code is ``""`` for 2xx."""
    resets: Counter[str] = field(default_factory=Counter)
    timeouts: Counter[str] = field(default_factory=Counter)
    protocol_errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    """Seconds, per kind, of every answered request, in completion order."""
    exceptions: Counter[str] = field(default_factory=Counter)
    """Exception names behind connect errors and resets, for diagnosis."""
    connections_opened: int = 0
    max_open_connections: int = 0
    send_lag_max_s: float = 0.0
    send_lag_sum_s: float = 0.0
    late_sends: int = 0
    """Arrivals handled more than 5 ms after their scheduled time."""
    cpu_s: float = 0.0
    """CPU the generator's process used during the run."""

    @property
    def offered(self) -> int:
        """Requests written to a connection."""
        return sum(self.sent.values())

    def good(self, kind: str | None = None) -> int:
        """200 answers (of ``kind``, or of all kinds)."""
        return sum(n for (k, status, _), n in self.answered.items()
                   if status == 200 and kind in (None, k))  # fmt: skip

    def goodput(self, kind: str | None = None) -> float:
        """200 answers per second of the load window."""
        return self.good(kind) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def dispatch_rate(self) -> float:
        """Arrivals the generator handled per second: below ``target_rate``, it fell behind."""
        window = max(self.duration_s, self.dispatch_window_s)
        return sum(self.scheduled.values()) / window if window > 0 else 0.0

    @property
    def unresolved(self) -> int:
        """Sent requests in no final bucket (0 once a run has returned)."""
        finished = (sum(self.answered.values()) + sum(self.resets.values())
                    + sum(self.timeouts.values()) + sum(self.protocol_errors.values()))  # fmt: skip
        return self.offered - finished

    def kinds(self) -> list[str]:
        """Every kind scheduled, in first-seen order."""
        return list(self.scheduled)

    def percentiles(self, kind: str, start: int = 0) -> dict[str, float]:
        """p50/p95/p99/max latency in ms of ``kind``'s answers (from the ``start``-th on)."""
        values = sorted(self.latencies.get(kind, [])[start:])
        if not values:
            return {}

        def pct(q: float) -> float:
            return round(values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] * 1e3, 3)

        return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
                "max": round(values[-1] * 1e3, 3)}  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        kinds: dict[str, Any] = {}
        for kind in self.kinds():
            answers = {
                f"{status} {code}".rstrip(): n
                for (k, status, code), n in sorted(self.answered.items())
                if k == kind
            }
            kinds[kind] = {
                "scheduled": self.scheduled[kind],
                "sent": self.sent[kind],
                "dropped": self.dropped[kind],
                "connect_errors": self.connect_errors[kind],
                "answered": answers,
                "resets": self.resets[kind],
                "timeouts": self.timeouts[kind],
                "protocol_errors": self.protocol_errors[kind],
                "goodput": round(self.goodput(kind), 2),
                "latency_ms": self.percentiles(kind),
            }
        scheduled = sum(self.scheduled.values())
        return {
            "mode": self.mode,
            "target_rate": self.target_rate,
            "duration_s": round(self.duration_s, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "generator": {
                "dispatch_rate": round(self.dispatch_rate, 2),
                "send_lag_mean_ms": round(1e3 * self.send_lag_sum_s / max(1, scheduled), 3),
                "send_lag_max_ms": round(1e3 * self.send_lag_max_s, 3),
                "late_sends": self.late_sends,
                "cpu_s": round(self.cpu_s, 2),
                "cpu_share": round(self.cpu_s / self.elapsed_s, 3) if self.elapsed_s else 0.0,
                "connections_opened": self.connections_opened,
                "max_open_connections": self.max_open_connections,
            },
            "totals": {
                "scheduled": scheduled,
                "sent": self.offered,
                "dropped": sum(self.dropped.values()),
                "connect_errors": sum(self.connect_errors.values()),
                "answered": sum(self.answered.values()),
                "good": self.good(),
                "goodput": round(self.goodput(), 2),
                "resets": sum(self.resets.values()),
                "timeouts": sum(self.timeouts.values()),
                "protocol_errors": sum(self.protocol_errors.values()),
                "unresolved": self.unresolved,
            },
            "kinds": kinds,
            "exceptions": dict(self.exceptions),
        }


class _Answer:
    """One parsed response."""

    __slots__ = ("body", "close", "status")

    def __init__(self, status: int, body: bytes, close: bool) -> None:
        self.status = status
        self.body = body
        self.close = close


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _UNTIL_EOF = range(6)


class _ResponseParser:
    """Incremental HTTP/1.x response parser, one response at a time; ``ValueError`` if malformed."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.head_request = False
        self._start()

    def _start(self) -> None:
        self.state = _HEAD
        self.status = 0
        self.close = False
        self.remaining = 0
        self.body = bytearray()

    def expect(self, head_request: bool) -> None:
        """Get ready for the answer to the next request (a HEAD request's answer has no body)."""
        self._start()
        self.head_request = head_request

    def feed(self, data: bytes) -> _Answer | None:
        """Take bytes off the wire; the answer once it is whole."""
        self.buffer += data
        return self._advance()

    def feed_eof(self) -> _Answer | None:
        """The connection closed: the answer, if its body was delimited by the close."""
        if self.state == _UNTIL_EOF:
            self.body += self.buffer
            self.buffer.clear()
            return self._done()
        return None

    def _done(self) -> _Answer:
        answer = _Answer(self.status, bytes(self.body), self.close)
        self._start()
        return answer

    def _advance(self) -> _Answer | None:
        buffer = self.buffer
        while True:
            state = self.state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD_BYTES:
                        raise ValueError("response head too large")
                    return None
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                if self._head(head):
                    return self._done()
            elif state == _BODY:
                if len(buffer) < self.remaining:
                    return None
                self.body += buffer[: self.remaining]
                del buffer[: self.remaining]
                return self._done()
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return None
                size = int(bytes(buffer[:end]).split(b";", 1)[0].strip(), 16)
                del buffer[: end + 2]
                if size < 0:
                    raise ValueError("negative chunk size")
                self.remaining = size
                self.state = _CHUNK_DATA if size else _TRAILERS
            elif state == _CHUNK_DATA:
                if len(buffer) < self.remaining + 2:
                    return None
                if buffer[self.remaining : self.remaining + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                self.body += buffer[: self.remaining]
                del buffer[: self.remaining + 2]
                self.state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return None
                del buffer[: end + 2]
                if end == 0:
                    return self._done()
            else:  # _UNTIL_EOF
                return None

    def _head(self, head: bytes) -> bool:
        """Read a status line and headers; True if the answer has no body."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
            raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        keep_alive = parts[0] == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ValueError(f"malformed header line: {line[:80]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
                if length < 0:
                    raise ValueError("negative Content-Length")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200 and status != 101:
            return False  # an interim answer (100 Continue): the real one follows
        self.status = status
        self.close = not keep_alive
        if self.head_request or status in (204, 304):
            return True
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.remaining = length
            if length == 0:
                return True
            self.state = _BODY
        else:
            self.state = _UNTIL_EOF
            self.close = True
        return False


def _error_code(status: int, body: bytes) -> str:
    if 200 <= status < 300:
        return ""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return NO_ERROR_BODY
    return code if isinstance(code, str) else NO_ERROR_BODY


class _Picker:
    """Smooth weighted round-robin: exact shares, evenly interleaved, no randomness."""

    def __init__(self, requests: Sequence[Request]) -> None:
        if not requests:
            raise ValueError("no requests to send: pass at least one Request")
        weights = [r.weight for r in requests]
        if any(w <= 0 for w in weights):
            raise ValueError("every Request.weight must be positive")
        self._plain = len(set(weights)) == 1
        self._weights = weights
        self._total = sum(weights)
        self._current = [0.0] * len(requests)
        self._next = 0

    def __call__(self) -> int:
        if self._plain:
            index = self._next
            self._next = (index + 1) % len(self._weights)
            return index
        current = self._current
        for i, weight in enumerate(self._weights):
            current[i] += weight
        index = max(range(len(current)), key=current.__getitem__)
        current[index] -= self._total
        return index


class _Engine:
    """Connections, their requests, and the counting; shared by both loops."""

    def __init__(self, url: str, requests: Sequence[Request], timeout_s: float,
                 result: Result) -> None:  # fmt: skip
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://host[:port], not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.kinds = [r.kind for r in requests]
        self.wires = [r.wire(parts.netloc) for r in requests]
        self.heads = [r.method == "HEAD" for r in requests]
        self.timeout_s = timeout_s
        self.result = result
        for kind in self.kinds:
            result.latencies.setdefault(kind, [])
        self.loop = asyncio.get_running_loop()
        self.open = 0
        self.inflight = 0
        self.idle: list[_Connection] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.quiet = asyncio.Event()

    def reserve(self) -> None:
        """Count a connection about to be opened, before any await, so the cap holds."""
        self.open += 1
        self.result.max_open_connections = max(self.result.max_open_connections, self.open)

    async def connect(self) -> _Connection:
        """Open the connection ``reserve`` counted (in ``open`` until it is lost)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except (OSError, TimeoutError):
            self.open -= 1
            raise
        self.result.connections_opened += 1
        return connection

    def lost(self) -> None:
        self.open -= 1

    def settle(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.quiet.set()

    def connect_failed(self, kind: str, exc: BaseException) -> None:
        self.result.connect_errors[kind] += 1
        self.result.exceptions[type(exc).__name__] += 1

    async def drain(self, deadline_s: float) -> None:
        """Wait until every request sent has its final bucket (timeouts bound the wait)."""
        if self.inflight:
            self.quiet.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline_s):
                    await self.quiet.wait()

    def close_all(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()
        for task in self.tasks:
            task.cancel()


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.result = engine.result
        self.parser = _ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.alive = True
        self.kind: str | None = None
        self.started = 0.0
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.on_done: Callable[[_Connection], None] = _ignore

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio subclass

    def send(self, index: int, started: float) -> None:
        """Write request ``index``; ``started`` is when its latency starts."""
        engine = self.engine
        kind = engine.kinds[index]
        self.kind = kind
        self.started = started
        self.parser.expect(engine.heads[index])
        self.result.sent[kind] += 1
        assert self.transport is not None
        self.transport.write(engine.wires[index])
        self.timer = engine.loop.call_later(engine.timeout_s, self._timed_out)

    def data_received(self, data: bytes) -> None:
        kind = self.kind
        if kind is None:
            # Unasked-for bytes on an idle connection (a 408 before a close): not reusable.
            self.close()
            return
        try:
            answer = self.parser.feed(data)
        except ValueError:
            self.result.protocol_errors[kind] += 1
            self._finish(abort=True)
            return
        if answer is not None:
            self._answered(kind, answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.engine.lost()
        kind = self.kind
        if kind is None:
            return
        answer = self.parser.feed_eof()
        if answer is not None:
            self._answered(kind, answer)
            return
        self.result.resets[kind] += 1
        self.result.exceptions[type(exc).__name__ if exc else "EOF"] += 1
        self._finish()

    def _answered(self, kind: str, answer: _Answer) -> None:
        now = time.perf_counter()
        self.result.latencies[kind].append(now - self.started)
        self.result.answered[kind, answer.status, _error_code(answer.status, answer.body)] += 1
        self.idle_since = now
        self._finish(abort=False, close=answer.close)

    def _timed_out(self) -> None:
        if self.kind is not None:
            self.result.timeouts[self.kind] += 1
            self._finish(abort=True)

    def _finish(self, abort: bool = False, close: bool = False) -> None:
        self.kind = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if abort and self.transport is not None:
            self.alive = False
            self.transport.abort()
        elif close:
            self.close()
        self.engine.settle()
        self.on_done(self)

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()


def _ignore(_: _Connection) -> None:
    return None


def _connect_then_send(
    engine: _Engine, index: int, started: float, release: Callable[[_Connection], None]
) -> None:
    async def connect_then_send() -> None:
        try:
            connection = await engine.connect()
        except (OSError, TimeoutError) as exc:
            engine.connect_failed(engine.kinds[index], exc)
            engine.settle()
            return
        connection.on_done = release
        connection.send(index, started)

    task = engine.loop.create_task(connect_then_send())
    engine.tasks.add(task)
    task.add_done_callback(engine.tasks.discard)


async def run_open_loop(
    url: str,
    requests: Sequence[Request],
    *,
    rate: float,
    duration_s: float,
    max_connections: int = 512,
    timeout_s: float = 30.0,
    seed: int = 0,
    arrivals: Literal["poisson", "uniform"] = "poisson",
    tick_s: float = 60.0,
    on_tick: Callable[[Result, float], Awaitable[None]] | None = None,
) -> Result:
    """Schedule requests at ``rate`` per second for ``duration_s``, then wait for the answers.

    Args:
        url: ``http://host:port`` of the server; each request's ``path`` is appended.
        requests: The mix, picked in smooth weighted round-robin by ``Request.weight``.
        rate: Arrivals per second.
        duration_s: How long arrivals are scheduled.
        max_connections: Connections open at most; an arrival with none idle and this many
            open is dropped (``Result.dropped``).
        timeout_s: Longest wait for a connection (then a connect error) and for an answer
            once the request is written (then a timeout).
        seed: Seeds the Poisson arrivals.
        arrivals: ``poisson`` (exponential gaps) or ``uniform`` (evenly spaced).
        tick_s: Period of ``on_tick`` calls.
        on_tick: Awaited with the live result and the seconds since the start, every
            ``tick_s`` within the window (the last at its end, if it falls on a tick); keep it
            short or hand work to a thread, the schedule waits for nothing.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration_s must be positive, not {rate} and {duration_s}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {max_connections}")
    result = Result("open", target_rate=rate)
    engine = _Engine(url, requests, timeout_s, result)
    pick = _Picker(requests)
    rng = random.Random(seed)
    idle = engine.idle
    kinds = engine.kinds

    def release(connection: _Connection) -> None:
        if connection.alive:
            idle.append(connection)

    def dispatch(index: int, now: float) -> None:
        kind = kinds[index]
        result.scheduled[kind] += 1
        while idle:
            connection = idle.pop()
            if not connection.alive:
                continue
            if now - connection.idle_since > _KEEPALIVE_IDLE_S:
                connection.close()
                continue
            engine.inflight += 1
            connection.send(index, now)
            return
        if engine.open >= max_connections:
            result.dropped[kind] += 1
            return
        engine.inflight += 1
        engine.reserve()
        _connect_then_send(engine, index, now, release)

    cpu_before = time.process_time()
    start = time.perf_counter()
    end = start + duration_s
    ticker = None
    if on_tick is not None:
        ticker = asyncio.create_task(_ticks(result, start, duration_s, tick_s, on_tick))
    uniform = arrivals == "uniform"
    count = 0
    due = start if uniform else start + rng.expovariate(rate)
    sleep = asyncio.sleep
    now = start
    try:
        while due < end:
            now = time.perf_counter()
            if due > now:
                await sleep(max(due - now, _MIN_SLEEP_S))
                now = time.perf_counter()
            while due <= now and due < end:
                lag = now - due
                result.send_lag_sum_s += lag
                if lag > result.send_lag_max_s:
                    result.send_lag_max_s = lag
                if lag > _LATE_S:
                    result.late_sends += 1
                dispatch(pick(), now)
                count += 1
                due = start + count / rate if uniform else due + rng.expovariate(rate)
        result.dispatch_window_s = now - start
        result.duration_s = duration_s
        if ticker is not None:
            await ticker
        await engine.drain(timeout_s + 5.0)
    finally:
        if ticker is not None:
            ticker.cancel()
        engine.close_all()
    result.elapsed_s = time.perf_counter() - start
    result.cpu_s = time.process_time() - cpu_before
    return result


async def _ticks(
    result: Result,
    start: float,
    duration_s: float,
    tick_s: float,
    on_tick: Callable[[Result, float], Awaitable[None]],
) -> None:
    for k in range(1, int(duration_s / tick_s + 1e-9) + 1):
        await asyncio.sleep(max(0.0, start + k * tick_s - time.perf_counter()))
        await on_tick(result, k * tick_s)


async def run_closed_loop(
    url: str,
    requests: Sequence[Request],
    *,
    clients: int,
    duration_s: float,
    timeout_s: float = 30.0,
) -> Result:
    """``clients`` keep-alive connections, each sending its next request once it has an answer.

    Requests are picked from the shared mix in smooth weighted round-robin. The window ends
    when the last client has its last answer; a client that cannot connect retries after 10 ms.
    """
    if clients < 1 or duration_s <= 0:
        raise ValueError(f"clients and duration_s must be positive, not {clients}, {duration_s}")
    result = Result("closed")
    engine = _Engine(url, requests, timeout_s, result)
    pick = _Picker(requests)
    loop = engine.loop
    start = time.perf_counter()
    end = start + duration_s

    async def client() -> None:
        connection: _Connection | None = None
        waiter: asyncio.Future[None] | None = None

        def wake(_: _Connection) -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        try:
            while time.perf_counter() < end:
                index = pick()
                kind = engine.kinds[index]
                result.scheduled[kind] += 1
                started = time.perf_counter()
                if connection is None or not connection.alive:
                    engine.reserve()
                    try:
                        connection = await engine.connect()
                    except (OSError, TimeoutError) as exc:
                        engine.connect_failed(kind, exc)
                        connection = None
                        await asyncio.sleep(0.01)
                        continue
                    connection.on_done = wake
                waiter = loop.create_future()
                engine.inflight += 1
                connection.send(index, started)
                await waiter
        finally:
            if connection is not None:
                connection.close()

    cpu_before = time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.elapsed_s = result.duration_s = result.dispatch_window_s = time.perf_counter() - start
    result.cpu_s = time.process_time() - cpu_before
    return result


def run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion on a fresh event loop: uvloop's if installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
