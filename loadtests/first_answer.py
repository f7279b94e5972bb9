"""Is a server warm when it says it is ready? The first answer of each HTTP worker after
``/readyz`` turned 200, against the same worker's steady state.

    python -m loadtests.first_answer                       # default model, 2 replicas
    python -m loadtests.first_answer --topology split --image photo

A server starts and is probed until ``/readyz`` answers 200 on 16 fresh connections in a row
(``harness.serving.wait_ready``: every worker ready). Then fresh connections each send one
``/classify`` and one ``GET /model`` (whose ``runtime.pid`` names the worker that answered) until
every worker has answered once; that is each worker's first answer. Each connection then sends
``--steady`` more, sequentially: the worker's steady state. Per worker: the first answer's time
(client-side) and its ``timing_ms`` (decode, queue, inference, postprocess) beside the steady
medians, and first / steady. Results: ``results/first-answer.json``. Issue 23 asks that the
first answer after ready be within 1.5x of steady state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from harness.samples import digit, multipart, photo
from harness.serving import REPO, serve

__all__ = ["main", "measure"]

STAGES = ("decode", "queue", "inference", "postprocess", "total")


def _one(client: httpx.Client, body: bytes, content_type: str) -> dict[str, Any]:
    started = time.perf_counter()
    answer = client.post("/classify", content=body, headers={"Content-Type": content_type})
    elapsed_ms = (time.perf_counter() - started) * 1e3
    answer.raise_for_status()
    timing = answer.json()["timing_ms"]
    return {"client_ms": elapsed_ms, **{stage: timing[stage] for stage in STAGES}}


def measure(env: dict[str, str], upload: bytes, steady: int, work: Path) -> dict[str, Any]:
    """One server: each worker's first answer after ready, and its steady state."""
    body, content_type = multipart({}, [("image", "upload", upload)])
    first: dict[int, dict[str, Any]] = {}
    clients: dict[int, httpx.Client] = {}
    with serve(env, work, ready_timeout_s=300) as server:
        workers = httpx.get(f"{server.url}/model", timeout=30).json()["runtime"]["http_workers"]
        spare: list[httpx.Client] = []
        for _ in range(64 * workers):
            if len(first) == workers:
                break
            client = httpx.Client(base_url=server.url, timeout=60)
            answer = _one(client, body, content_type)
            pid = client.get("/model").json()["runtime"]["pid"]
            if pid in first:
                spare.append(client)
                continue
            first[pid], clients[pid] = answer, client
        rows = {}
        for pid, client in clients.items():
            later = [_one(client, body, content_type) for _ in range(steady)]
            median = {k: statistics.median(a[k] for a in later) for k in ("client_ms", *STAGES)}
            rows[str(pid)] = {
                "first": {k: round(v, 3) for k, v in first[pid].items()},
                "steady_median": {k: round(v, 3) for k, v in median.items()},
                "first_over_steady": round(first[pid]["client_ms"] / median["client_ms"], 2),
            }
        for client in [*clients.values(), *spare]:
            client.close()
    return {"workers": workers, "seen": len(first), "per_worker": rows}


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
    args = parser.parse_args(argv)
    upload = digit(3, 64, False) if args.image == "digit" else photo(640, 480)
    env = {"VIT_ACCESS_LOG": "false", "VIT_TOPOLOGY": args.topology}
    work = REPO / "results" / "work"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for _ in range(args.runs):
        runs.append(measure(env, upload, args.steady, work))
        print(json.dumps(runs[-1]), flush=True)
    out = {"topology": args.topology, "image": args.image, "runs": runs}
    (REPO / "results" / "first-answer.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
