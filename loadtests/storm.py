"""Retry-storm drill: goodput while clients resend the moment they are refused.

``python -m loadtests.storm`` (``make storm``) measures, on one server at a time:

1. **capacity**: good answers per second of ``wrk -t1 -c16`` against the default settings;
2. **the storm**: ``wrk -t1 -c400`` (every connection resends as soon as it has any answer: a
   naive retry loop that ignores ``Retry-After``) against a server started with
   ``VIT_MAX_QUEUE_IMAGES=32 VIT_MAX_BATCH_SIZE=16``, so most requests are refused at the gate.

Each upload is a 64x64 PNG with ``attention=none``. Goodput under the storm is its 200 answers
per second over the capacity. ``--pin`` puts the server (and every process it starts) on the first
CPU and wrk on the second, as clients on other machines would be; without it they share the
cores. The server's CPU per answer and per refusal is reported beside each phase. Results:
``results/storm{,-pinned}.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from harness.samples import digit, multipart
from harness.serving import REPO, pinned, serve, server_cpu
from loadtests.bench import Load, drive_wrk

__all__ = ["STORM_ENV", "main", "storm"]

STORM_ENV = {"VIT_MAX_QUEUE_IMAGES": "32", "VIT_MAX_BATCH_SIZE": "16"}


def _phase(
    env: dict[str, str], clients: int, seconds: float, work: Path, cpus: tuple[Any, Any]
) -> dict[str, Any]:
    server_cpus, client_cpus = cpus
    body, content_type = multipart({"attention": "none"}, [("image", "d.png", digit(3, 64, False))])
    with contextlib.ExitStack() as stack:
        with pinned(server_cpus):  # the server and all it starts inherit these CPUs
            server = stack.enter_context(serve({"VIT_ACCESS_LOG": "false", **env}, work))
        stack.enter_context(pinned(client_cpus))
        url = f"{server.url}/classify"
        drive_wrk(url, body, content_type, 16, 2, threads=1)  # warm-up
        with server_cpu(server) as cpu:
            load: Load = drive_wrk(url, body, content_type, clients, seconds, threads=1)
    good = load.requests - (load.non2xx or 0)
    refused = load.non2xx or 0
    return {
        "clients": clients,
        "env": env,
        "seconds": load.seconds,
        "good_per_s": round(good / load.seconds, 1),
        "refused_per_s": round(refused / load.seconds, 1),
        "socket_errors": load.socket_errors,
        "p50_ms": round(load.p50_ms, 2),
        "p99_ms": round(load.p99_ms, 2),
        "server_cpu_share": round(cpu["seconds"] / load.seconds, 3),
        "server_cpu_us_per_request": round(1e6 * cpu["seconds"] / max(1, load.requests), 1),
        "client_cores": round(load.client_cores or 0.0, 3),
    }


def storm(seconds: float, work: Path, pin: bool) -> dict[str, Any]:
    """Capacity, then the storm; goodput under the storm over capacity."""
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        placement: tuple[Any, Any] = ({cpus[0]}, {cpus[1]})
    else:
        placement = (None, None)
    capacity = _phase({}, 16, seconds, work, placement)
    storm = _phase(STORM_ENV, 400, seconds, work, placement)
    ratio = storm["good_per_s"] / capacity["good_per_s"] if capacity["good_per_s"] else 0.0
    return {"pinned": pin, "capacity": capacity, "storm": storm, "goodput_ratio": round(ratio, 3)}


def _markdown(result: dict[str, Any]) -> str:
    where = "server on CPU 0, wrk on CPU 1" if result["pinned"] else "shared cores"
    lines = [
        f"# Retry storm ({where})",
        "",
        "| phase | clients | good/s | refused/s | p50 ms | p99 ms | server CPU share | "
        "server CPU µs per request | socket errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("capacity", "storm"):
        row = result[phase]
        lines.append(
            f"| {phase} | {row['clients']} | {row['good_per_s']:.0f} | {row['refused_per_s']:.0f}"
            f" | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['server_cpu_share']:.2f} | "
            f"{row['server_cpu_us_per_request']:.0f} | {row['socket_errors']} |"
        )
    lines += ["", f"Goodput under the storm: **{result['goodput_ratio']:.2f}** of capacity."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, wrk on CPU 1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or REPO / "results" / ("storm-pinned" if args.pin else "storm")
    work = out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    result = storm(args.seconds, work, args.pin)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = _markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
