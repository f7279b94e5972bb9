"""``make loadtest``: a headless locust run, against a fresh local service unless --host is given.

    python -m loadtests.loadtest --users 16 --duration 60 --max-p95-ms 2000 [--shape spike]
    python -m loadtests.loadtest --host http://127.0.0.1:3000 ...   # a service already running

It prints the locust command it runs, writes CSV and HTML reports under --results, and exits
with locust's code: non-zero on any failure, p95 above --max-p95-ms, or a mismatch between what
locust sent and what the service counted.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from harness.serving import REPO, serve

__all__ = ["locust_command", "main"]


def locust_command(
    host: str,
    *,
    users: int,
    spawn_rate: float,
    duration: int,
    max_p95_ms: float,
    results: Path,
    shape: str = "steady",
    bad_share: float = 0.02,
    photos: str = "on",
) -> list[str]:
    """The locust command line for one headless run."""
    return [
        sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"),
        "--headless", "--host", host, "-u", str(users), "-r", str(spawn_rate),
        "-t", f"{duration}s", "--stop-timeout", "30", "--only-summary",
        "--csv", str(results / "loadtest"), "--html", str(results / "loadtest.html"),
        "--max-p95-ms", str(max_p95_ms), "--shape", shape, "--bad-share", str(bad_share),
        "--photos", photos,
    ]  # fmt: skip


@contextlib.contextmanager
def _target(host: str | None, log_dir: Path) -> Iterator[str]:
    if host:
        yield host
        return
    with serve({"VIT_ACCESS_LOG": "false"}, log_dir) as server:
        yield server.url


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="a running service; default: start one on 127.0.0.1")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=8)
    parser.add_argument("--duration", type=int, default=60, help="seconds")
    parser.add_argument("--max-p95-ms", type=float, default=5000)
    parser.add_argument("--shape", choices=["steady", "ramp", "spike"], default="steady")
    parser.add_argument("--bad-share", type=float, default=0.02)
    parser.add_argument("--photos", choices=["on", "off"], default="on")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "loadtest")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    with _target(args.host, args.results) as host:
        command = locust_command(
            host,
            users=args.users,
            spawn_rate=args.spawn_rate,
            duration=args.duration,
            max_p95_ms=args.max_p95_ms,
            results=args.results,
            shape=args.shape,
            bad_share=args.bad_share,
            photos=args.photos,
        )
        print("$ " + shlex.join(command), flush=True)
        code = subprocess.run(command, cwd=REPO, timeout=args.duration + 180).returncode
    print(f"reports: {args.results}/loadtest_stats.csv, {args.results}/loadtest.html")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
