"""Open-loop HTTP load from the command line: one run of ``harness/load.py``'s client, its JSON
summary on stdout.

    python -m loadtests.openloop --url http://127.0.0.1:3000 --path /classify --image d.png \\
        --rate 1000 --seconds 30                      # open loop, Poisson arrivals
    python -m loadtests.openloop --url ... --clients 16 --seconds 20       # closed loop
    python -m loadtests.openloop --ceiling --rate 20000 --seconds 5        # the generator's own
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
from pathlib import Path
from typing import cast

from harness.load import Request, run_closed_loop, run_loop, run_open_loop
from harness.samples import multipart

__all__ = ["main"]


class _TrivialServer(asyncio.Protocol):
    """Answers every request with a small 200 at once: the generator's ceiling, nothing else."""

    ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
              b"\r\n{\"ok\": true}")  # fmt: skip

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end].lower()
            marker = head.find(b"content-length:")
            length = int(head[marker + 15 :].split(b"\r\n", 1)[0]) if marker >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                break
            self.buffer = self.buffer[end + 4 + length :]
            answers += 1
        if answers and self.transport is not None:
            self.transport.write(self.ANSWER * answers)


def _serve_trivial(sock: socket.socket) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_TrivialServer, sock=sock)
        await server.serve_forever()

    run_loop(serve())


def _build_requests(args: argparse.Namespace) -> list[Request]:
    headers = []
    for line in args.header:
        name, colon, value = line.partition(":")
        if not colon:
            raise SystemExit(f"--header wants 'Name: value', not {line!r}")
        headers.append((name.strip(), value.strip()))
    body = b""
    if args.image:
        image = Path(args.image)
        body, content_type = multipart({}, [(args.field, image.name, image.read_bytes())])
        headers.append(("Content-Type", content_type))
    elif args.body_file:
        body = Path(args.body_file).read_bytes()
        headers.append(("Content-Type", args.content_type))
    method = args.method or ("POST" if body else "GET")
    return [Request(args.path, method, args.path, body, tuple(headers))]


def main(argv: list[str] | None = None) -> int:
    """CLI: one run, its JSON summary on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="http://host:port of the server")
    parser.add_argument("--path", default="/")
    parser.add_argument("--method", help="default: POST with a body, else GET")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--image", help="send this file as a multipart upload in --field")
    parser.add_argument("--field", default="image")
    parser.add_argument("--body-file", help="send this file's bytes as the body")
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--rate", type=float, help="open loop: arrivals per second")
    parser.add_argument("--clients", type=int, help="closed loop: this many clients instead")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="drive a trivial HTTP server in a child process instead of --url: the generator's "
        "own ceiling on this machine",
    )
    args = parser.parse_args(argv)
    if (args.rate is None) == (args.clients is None):
        parser.error("give exactly one of --rate (open loop) and --clients (closed loop)")
    if not args.ceiling and not args.url:
        parser.error("give --url, or --ceiling")
    requests = _build_requests(args)
    child = None
    url = args.url
    if args.ceiling:
        sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        child = multiprocessing.get_context("fork").Process(
            target=_serve_trivial, args=(sock,), daemon=True
        )
        child.start()
        sock.close()
    try:
        if args.rate is not None:
            result = run_loop(run_open_loop(
                url, requests, rate=args.rate, duration_s=args.seconds,
                max_connections=args.max_connections, timeout_s=args.timeout, seed=args.seed,
                arrivals=args.arrivals,
            ))  # fmt: skip
        else:
            result = run_loop(run_closed_loop(
                url, requests, clients=args.clients, duration_s=args.seconds,
                timeout_s=args.timeout,
            ))  # fmt: skip
    finally:
        if child is not None:
            child.terminate()
            child.join(timeout=5)
    summary = {"url": url, **({"ceiling": True} if args.ceiling else {}), **result.summary()}
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
