"""The HTTP load client (open and closed loop): its HTTP parser, and its counting against a tiny
local server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from harness import load
from harness.load import NO_ERROR_BODY, Request, Result, run_closed_loop, run_open_loop

_ERROR_BODY = json.dumps({"error": {"code": "invalid_top_k", "message": "1..10"}}).encode()


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# path -> what the server does after reading the request.
_ROUTES: dict[str, list[bytes] | str] = {
    "/ok": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"],
    # Head, chunks and trailer in separate writes: the parser must put them back together.
    "/chunked": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"4;ext=1\r\nWi",
        b"ki\r\n5\r\npedia\r\n",
        b"0\r\nX-Trailer: y\r\n\r\n",
    ],
    "/error": [
        b"HTTP/1.1 422 Unprocessable\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked(_ERROR_BODY[:10], _ERROR_BODY[10:])
    ],
    "/text500": [b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nboom"],
    "/close": "close",  # 200 with Connection: close, then closes
    "/quiet-close": "quiet-close",  # 200 framed by length, then closes without saying so
    "/until-eof": "until-eof",  # 200 with neither length nor chunks: body ends at the close
    "/reset": "reset",  # RST once the request is in
    "/partial": "partial",  # half an answer, then closes
    "/silent": "silent",  # never answers
    "/garbage": [b"SPDY/9 what\r\n\r\n"],
}


class _Server:
    """A tiny HTTP/1.1 server on 127.0.0.1 that answers by path (``_ROUTES``)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: Counter[str] = Counter()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                path = head[0].split(" ")[1]
                length = next(
                    (
                        int(line.split(":")[1])
                        for line in head
                        if line.lower().startswith("content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                self.requests[path] += 1
                if not await self.answer(path, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False once the connection is to be closed."""
        route = _ROUTES[path]
        if isinstance(route, list):
            for piece in route:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
            return True
        if route == "close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        elif route == "quiet-close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif route == "until-eof":
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nthe whole rest")
        elif route == "partial":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        elif route == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif route == "silent":
            await asyncio.sleep(3600)
        await writer.drain()
        return False


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[_Server]:
    server = _Server()
    server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = server.server.sockets[0].getsockname()[1]
    async with server.server:
        yield server


def _run(coroutine: Callable[[], Coroutine[Any, Any, Any]], loop: str) -> Any:
    if loop == "uvloop":
        return load.run_loop(coroutine())
    return asyncio.run(coroutine())


def _accounted(result: Result) -> None:
    """Every scheduled request is in exactly one bucket."""
    for kind in result.kinds():
        lost = result.dropped[kind] + result.connect_errors[kind]
        assert result.scheduled[kind] == result.sent[kind] + lost, kind
    assert result.unresolved == 0


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


# ---- the parser ------------------------------------------------------------------------------


def _parse_bytewise(data: bytes, head_request: bool = False) -> list[tuple[int, bytes, bool]]:
    parser = load._ResponseParser()
    parser.expect(head_request)
    answers = []
    for i in range(len(data)):
        answer = parser.feed(data[i : i + 1])
        if answer is not None:
            answers.append((answer.status, answer.body, answer.close))
            parser.expect(head_request)
    eof = parser.feed_eof()
    if eof is not None:
        answers.append((eof.status, eof.body, eof.close))
    return answers


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        # length-framed, keep-alive by default in HTTP/1.1
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", [(200, b"hello", False)]),
        # two answers back to back on one connection
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na" * 2, [(200, b"a", False)] * 2),
        # chunked with an extension and a trailer; header names in any case
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n"
            b"0\r\nTrailer: 1\r\n\r\n",
            [(200, b"abcde", False)],
        ),
        # Connection: close among other tokens
        (
            b"HTTP/1.1 503 No\r\nConnection: foo, Close\r\nContent-Length: 0\r\n\r\n",
            [(503, b"", True)],
        ),
        # HTTP/1.0: close unless keep-alive is asked for
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", [(200, b"x", True)]),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
            [(200, b"x", False)],
        ),
        # an interim 100 Continue, then the answer
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            [(201, b"ok", False)],
        ),
        # 204 has no body whatever it says
        (b"HTTP/1.1 204 No Content\r\n\r\n", [(204, b"", False)]),
        # neither length nor chunks: the body ends at the close
        (b"HTTP/1.1 200 OK\r\n\r\nto the end", [(200, b"to the end", True)]),
    ],
)
def test_parser_reads_answers_fed_byte_by_byte(
    wire: bytes, expected: list[tuple[int, bytes, bool]]
) -> None:
    assert _parse_bytewise(wire) == expected


def test_parser_knows_a_head_answer_has_no_body() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"
    assert _parse_bytewise(wire, head_request=True) == [(200, b"", False)]


@pytest.mark.parametrize(
    "wire",
    [
        b"SPDY/3 200 OK\r\n\r\n",  # not HTTP/1.x
        b"HTTP/1.1 2000 OK\r\n\r\n",  # status not 3 digits
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",  # malformed header
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",  # negative length
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # chunk size not hex
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",  # no CRLF after data
    ],
)
def test_parser_refuses_what_is_not_http(wire: bytes) -> None:
    parser = load._ResponseParser()
    parser.expect(False)
    with pytest.raises(ValueError):
        parser.feed(wire)


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (200, b"{}", ""),
        (422, _ERROR_BODY, "invalid_top_k"),
        (500, b"Internal Server Error", NO_ERROR_BODY),
        (404, b'{"detail": "Not Found"}', NO_ERROR_BODY),
        (413, b'{"error": {"code": 7}}', NO_ERROR_BODY),
    ],
)
def test_error_code_comes_from_the_json_body(status: int, body: bytes, code: str) -> None:
    assert load._error_code(status, body) == code


def test_request_wire_adds_host_and_length() -> None:
    request = Request("k", "POST", "/classify?top_k=3", b"abc", (("Content-Type", "x/y"),))
    assert request.wire("h:1") == (
        b"POST /classify?top_k=3 HTTP/1.1\r\nHost: h:1\r\nContent-Type: x/y\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    assert Request("k", "GET", "/").wire("h") == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def test_weighted_mix_keeps_exact_shares() -> None:
    pick = load._Picker([Request("a", "GET", "/", weight=3), Request("b", "GET", "/")])
    assert Counter(pick() for _ in range(400)) == Counter({0: 300, 1: 100})
    with pytest.raises(ValueError, match="positive"):
        load._Picker([Request("a", "GET", "/", weight=0)])


# ---- against the tiny server ----------------------------------------------------------------


@LOOPS
def test_closed_loop_keeps_one_connection_alive(loop: str) -> None:
    async def scenario() -> tuple[Result, _Server]:
        async with _serving() as server:
            requests = [Request("ok", "GET", "/ok"), Request("chunked", "GET", "/chunked")]
            result = await run_closed_loop(server.url, requests, clients=1, duration_s=0.3)
            return result, server

    result, server = _run(scenario, loop)
    _accounted(result)
    assert server.connections == 1
    assert result.good() == result.offered == sum(server.requests.values()) > 10
    assert result.answered.keys() == {("ok", 200, ""), ("chunked", 200, "")}
    assert result.percentiles("ok")["p50"] > 0


@LOOPS
def test_connection_close_is_honoured(loop: str) -> None:
    async def scenario() -> tuple[Result, _Server]:
        async with _serving() as server:
            requests = [Request("close", "GET", "/close"), Request("eof", "GET", "/until-eof")]
            result = await run_closed_loop(server.url, requests, clients=2, duration_s=0.3)
            return result, server

    result, server = _run(scenario, loop)
    _accounted(result)
    assert result.good() == result.offered == server.connections > 10
    assert sum(result.resets.values()) == 0


def test_open_loop_counts_statuses_and_error_codes_per_kind() -> None:
    async def scenario() -> Result:
        async with _serving() as server:
            requests = [
                Request("chunked", "GET", "/chunked", weight=2),
                Request("error", "POST", "/error", b"x" * 3000),
                Request("text", "GET", "/text500"),
            ]
            return await run_open_loop(
                server.url, requests, rate=200, duration_s=0.4, arrivals="uniform"
            )

    result = load.run_loop(scenario())
    _accounted(result)
    assert result.scheduled == Counter({"chunked": 40, "error": 20, "text": 20})
    assert result.answered == Counter(
        {
            ("chunked", 200, ""): 40,
            ("error", 422, "invalid_top_k"): 20,
            ("text", 500, NO_ERROR_BODY): 20,
        }
    )
    assert result.goodput("chunked") == pytest.approx(100)
    assert result.goodput("error") == 0
    summary = result.summary()
    assert summary["kinds"]["error"]["answered"] == {"422 invalid_top_k": 20}
    assert summary["totals"]["unresolved"] == 0
    assert summary["generator"]["dispatch_rate"] == pytest.approx(200, rel=0.05)


@LOOPS
def test_reset_after_the_request_is_counted_as_reset(loop: str) -> None:
    async def scenario() -> tuple[Result, _Server]:
        async with _serving() as server:
            requests = [
                Request("reset", "POST", "/reset", b"body"),
                Request("partial", "GET", "/partial"),
            ]
            result = await run_open_loop(
                server.url, requests, rate=100, duration_s=0.2, arrivals="uniform"
            )
            return result, server

    result, server = _run(scenario, loop)
    _accounted(result)
    assert result.resets == Counter({"reset": 10, "partial": 10})
    assert result.sent == result.resets
    assert sum(server.requests.values()) == 20
    assert not result.answered
    assert result.exceptions["ConnectionResetError"] == 10


def test_a_server_closing_idle_connections_causes_no_reset() -> None:
    async def scenario() -> tuple[Result, _Server]:
        async with _serving() as server:
            requests = [Request("quiet", "GET", "/quiet-close")]
            result = await run_open_loop(
                server.url, requests, rate=50, duration_s=0.4, arrivals="uniform"
            )
            return result, server

    result, server = _run(scenario, "uvloop")
    _accounted(result)
    assert result.good() == 20 == server.connections
    assert not result.resets


def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        result = load.run_loop(
            run_open_loop(
                f"http://127.0.0.1:{port}",
                [Request("ok", "GET", "/ok")],
                rate=100,
                duration_s=0.2,
                arrivals="uniform",
            )
        )
        closed = load.run_loop(
            run_closed_loop(
                f"http://127.0.0.1:{port}", [Request("ok", "GET", "/ok")], clients=2, duration_s=0.1
            )
        )
    _accounted(result)
    assert result.connect_errors == Counter({"ok": 20}) == result.scheduled
    assert result.offered == 0
    assert result.exceptions == Counter({"ConnectionRefusedError": 20})
    _accounted(closed)
    assert closed.connect_errors["ok"] > 2
    assert closed.offered == 0


def test_timeouts_and_an_exhausted_pool_are_counted_apart() -> None:
    async def scenario() -> Result:
        async with _serving() as server:
            return await run_open_loop(
                server.url,
                [Request("silent", "GET", "/silent")],
                rate=100,
                duration_s=0.2,
                max_connections=3,
                timeout_s=0.3,
                arrivals="uniform",
            )

    result = load.run_loop(scenario())
    _accounted(result)
    assert result.scheduled["silent"] == 20
    assert result.sent["silent"] == 3 == result.timeouts["silent"]
    assert result.dropped["silent"] == 17
    assert result.max_open_connections == 3


def test_protocol_errors_are_counted() -> None:
    async def scenario() -> Result:
        async with _serving() as server:
            return await run_open_loop(
                server.url,
                [Request("junk", "GET", "/garbage")],
                rate=50,
                duration_s=0.2,
                arrivals="uniform",
            )

    result = load.run_loop(scenario())
    _accounted(result)
    assert result.protocol_errors == Counter({"junk": 10})


def test_idle_connections_past_the_keep_alive_window_are_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(load, "_KEEPALIVE_IDLE_S", 0.02)

    async def scenario() -> tuple[Result, _Server]:
        async with _serving() as server:
            result = await run_open_loop(
                server.url,
                [Request("ok", "GET", "/ok")],
                rate=20,
                duration_s=0.3,
                arrivals="uniform",
            )
            return result, server

    result, server = _run(scenario, "uvloop")
    _accounted(result)
    assert result.good() == 6 == server.connections == result.connections_opened


def test_on_tick_sees_the_live_result() -> None:
    seen: list[tuple[float, int]] = []

    async def tick(result: Result, at: float) -> None:
        seen.append((at, result.offered))

    async def scenario() -> Result:
        async with _serving() as server:
            return await run_open_loop(
                server.url,
                [Request("ok", "GET", "/ok")],
                rate=100,
                duration_s=0.35,
                arrivals="uniform",
                tick_s=0.1,
                on_tick=tick,
            )

    result = load.run_loop(scenario())
    assert [at for at, _ in seen] == pytest.approx([0.1, 0.2, 0.3])
    assert [sent for _, sent in seen] == sorted(sent for _, sent in seen)
    assert seen[-1][1] < result.offered == 35


def test_poisson_arrivals_are_seeded() -> None:
    async def scenario(seed: int) -> Result:
        async with _serving() as server:
            return await run_open_loop(
                server.url, [Request("ok", "GET", "/ok")], rate=300, duration_s=0.3, seed=seed
            )

    counts = [load.run_loop(scenario(seed)).scheduled["ok"] for seed in (1, 1, 2)]
    assert counts[0] == counts[1]
    assert 40 < counts[2] < 160
