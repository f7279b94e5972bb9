"""Is a server warm when it says it is ready? The first answer of each HTTP worker after
``/readyz`` turned 200, against the same worker's steady state.

    python -m loadtests.first_answer                       # default model, 2 replicas
    python -m loadtests.first_answer --topology split --image photo
    python -m loadtests.first_answer --swap        # and each worker's first answer from v2

A server starts and is probed until ``/readyz`` answers 200 on 16 fresh connections in a row
(``harness.serving.wait_ready``: every worker ready). Then fresh connections each send one
``/classify`` and one ``GET /model`` (whose ``runtime.pid`` names the worker that answered) until
every worker has answered once; that is each worker's first answer. Each connection then sends
``--steady`` more, sequentially: the worker's steady state back to back. And, since the first
answer is a lone request on a fresh connection to a model idle since its warm-up, the same kind
of request once warm: fresh connections, each after a pause (``--pause``, 0.5 s), until every
worker answered ``--steady`` of them (the lone steady state). Per worker: the first answer's
time (client-side) and its ``timing_ms`` (decode, queue, inference, postprocess) beside both
medians, and first / steady for each. Results: ``results/first-answer.json``. Issue 23 asks
that the first answer after ready be within 1.5x of steady state.

Why both: on this 2-core machine a lone batch after a 0.3 s pause took 2.6 ms against 1.3 ms
back to back (the digits model, the same engine and thread; caches and clocks go cold), so the
back-to-back figure is not what a first request can reach, warm or not; the lone figure is
the same request asked the same way, with nothing left cold but what an idle second leaves.
"""

from __future__ import annotations

import argparse
import gc
import http.server
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from harness.samples import digit, multipart, photo
from harness.serving import REPO, serve
from harness.versions import shifted_digits

__all__ = ["main", "measure"]

_TOKEN = "first-answer-t0ken"

STAGES = ("decode", "queue", "inference", "postprocess", "total")


def _one(client: httpx.Client, body: bytes, content_type: str) -> dict[str, Any]:
    gc.disable()  # this process's own collections are not the server's time
    try:
        started = time.perf_counter()
        answer = client.post("/classify", content=body, headers={"Content-Type": content_type})
        elapsed_ms = (time.perf_counter() - started) * 1e3
    finally:
        gc.enable()
    answer.raise_for_status()
    answered = answer.json()
    timing = answered["timing_ms"]
    return {
        "client_ms": elapsed_ms,
        **{stage: timing[stage] for stage in STAGES},
        "version": answered["model"]["version"],
    }


def _warm_this_client(body: bytes, content_type: str) -> None:
    """One POST from this process to a throwaway local HTTP server: the client's own first use
    (httpx's lazy imports, its first connection) is not the server's. Measured: the run's very
    first answer took 12-17 ms at the client against 4 ms in the server without this."""

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Sink) as sink:
        thread = threading.Thread(target=sink.serve_forever, daemon=True)
        thread.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{sink.server_port}") as client:
            client.post("/", content=body, headers={"Content-Type": content_type})
        sink.shutdown()


def _firsts(
    url: str, body: bytes, content_type: str, workers: int
) -> tuple[dict[int, dict[str, Any]], dict[int, httpx.Client]]:
    """Fresh connections, one request each, until every worker answered once: each worker's
    first answer (and the connection it came on)."""
    first: dict[int, dict[str, Any]] = {}
    clients: dict[int, httpx.Client] = {}
    for _ in range(64 * workers):
        if len(first) == workers:
            break
        client = httpx.Client(base_url=url, timeout=60)
        answer = _one(client, body, content_type)
        pid = client.get("/model").json()["runtime"]["pid"]
        if pid in first:
            client.close()
            continue
        first[pid], clients[pid] = answer, client
    return first, clients


def _lones(
    url: str, body: bytes, content_type: str, pids: set[int], count: int, pause_s: float
) -> dict[int, list[dict[str, Any]]]:
    """Lone requests once warm, asked as a first one is: a fresh connection after a pause,
    until each worker answered ``count``."""
    lone: dict[int, list[dict[str, Any]]] = {pid: [] for pid in pids}
    for _ in range(64 * len(pids) * count):
        if all(len(answers) >= count for answers in lone.values()):
            break
        time.sleep(pause_s)
        with httpx.Client(base_url=url, timeout=60) as client:
            answer = _one(client, body, content_type)
            pid = client.get("/model").json()["runtime"]["pid"]
        if pid in lone:
            lone[pid].append(answer)
    return lone


def _row(
    first: dict[str, Any], lone: list[dict[str, Any]], steady: list[dict[str, Any]] | None
) -> dict[str, Any]:
    alone = _median(lone)
    row: dict[str, Any] = {
        "first": {k: v if isinstance(v, str) else round(v, 3) for k, v in first.items()},
        "lone_median": alone,
        "first_over_lone": round(first["client_ms"] / alone["client_ms"], 2),
    }
    if steady:
        median = _median(steady)
        row["steady_median"] = median
        row["first_over_steady"] = round(first["client_ms"] / median["client_ms"], 2)
    return row


def measure(
    env: dict[str, str],
    upload: bytes,
    steady: int,
    work: Path,
    pause_s: float = 0.5,
    swap: bool = False,
) -> dict[str, Any]:
    """One server: each worker's first answer after ready, and its steady state: back to back
    on one connection, and lone requests made as the first was (``pause_s`` apart). With
    ``swap``: then version 2 is loaded (the repository API) and each worker's first answer
    from it is measured the same way."""
    body, content_type = multipart({}, [("image", "upload", upload)])
    _warm_this_client(body, content_type)
    if swap:
        env = {**env, "VIT_ADMIN_TOKEN": _TOKEN}
    with serve(env, work, ready_timeout_s=300) as server:
        url = server.url
        workers = httpx.get(f"{url}/model", timeout=30).json()["runtime"]["http_workers"]
        first, clients = _firsts(url, body, content_type, workers)
        lone = _lones(url, body, content_type, set(first), steady, pause_s)
        rows = {}
        for pid, client in clients.items():
            later = [_one(client, body, content_type) for _ in range(steady)]
            rows[str(pid)] = _row(first[pid], lone[pid], later)
            client.close()
        out: dict[str, Any] = {"workers": workers, "seen": len(first), "per_worker": rows}
        if swap:
            name = httpx.get(f"{url}/model", timeout=30).json()["model"]["name"]
            loaded = httpx.post(
                f"{url}/v2/repository/models/{name}/load",
                json={"parameters": {"source": shifted_digits(work / "v2")}},
                headers={"Authorization": f"Bearer {_TOKEN}"},
                timeout=600,
            )
            loaded.raise_for_status()
            first, clients = _firsts(url, body, content_type, workers)
            for client in clients.values():
                client.close()
            lone = _lones(url, body, content_type, set(first), steady, pause_s)
            out["after_swap"] = {
                "version": loaded.json()["version"],
                "per_worker": {str(pid): _row(first[pid], lone[pid], None) for pid in first},
            }
    return out


def _median(answers: list[dict[str, Any]]) -> dict[str, float]:
    return {k: round(statistics.median(a[k] for a in answers), 3) for k in ("client_ms", *STAGES)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="auto", choices=["auto", "replicas", "split"])
    parser.add_argument(
        "--image",
        default="digit",
        choices=["digit", "photo"],
        help="a 64x64 PNG digit (decoded inline) or a 640x480 JPEG (the decode pool)",
    )
    parser.add_argument("--steady", type=int, default=30, help="answers per worker after it")
    parser.add_argument("--runs", type=int, default=1, help="servers started, one after another")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds before a lone request")
    parser.add_argument(
        "--swap", action="store_true", help="then load version 2 and measure its first answers"
    )
    args = parser.parse_args(argv)
    upload = digit(3, 64, False) if args.image == "digit" else photo(640, 480)
    env = {"VIT_ACCESS_LOG": "false", "VIT_TOPOLOGY": args.topology}
    work = REPO / "results" / "work"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for _ in range(args.runs):
        runs.append(measure(env, upload, args.steady, work, args.pause, args.swap))
        print(json.dumps(runs[-1]), flush=True)
    out = {"topology": args.topology, "image": args.image, "runs": runs}
    (REPO / "results" / "first-answer.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
