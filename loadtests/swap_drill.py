"""Drills for models that change without downtime (issue 23): a swap under open-loop load, and
the response cache against no cache.

    python -m loadtests.swap_drill swap                 # digits v1 -> v2 under 70% load
    python -m loadtests.swap_drill swap --topology split    # HTTP workers + a model process
    python -m loadtests.swap_drill swap --model vit-small   # memory that shows: 22M params
    python -m loadtests.swap_drill cache                # repeated uploads, cache on vs off
    python -m loadtests.swap_drill models               # two models vs one on the same cores

``swap``: one ``bentoml serve`` of two replicas (``VIT_WORKERS=2``; with ``--topology split``,
two HTTP workers and a model process). Its capacity is measured
first (closed loop, 32 clients); then an open loop at ``--load`` of it (Poisson arrivals,
``harness/load.py``) runs for ``--seconds``, and ``--at`` seconds in, the repository API loads
version 2 (for digits: the head rolled by one, so answers name the next digit; for ViT-S: other
random weights), then a source that cannot load. Beside the load, an observer sends one request
at a time on fresh connections and records which version answered when, and the replicas' RSS
is sampled every 50 ms. Reported: every request's fate (a failure is any answer but 200, a
reset, a timeout, a dropped arrival), the load call's phases (prepare: every replica loaded and
warm; switch: every replica switched, its old version done with what it held), when answers
changed version, memory before / peak during / after, and the failed load's answer.

``cache``: the same server with the cache off, then on (``VIT_CACHE_BYTES``), each under a
closed loop of 32 clients sending 64 distinct digit uploads round-robin for ``--seconds``:
req/s, p50/p99, and the hit ratio from ``vit_cache_lookups_total``.

``models``: one model (digits) served alone, then two (digits and its shifted head,
``VIT_MODELS``) on the same cores (``--topology``), each under a closed loop of 32 clients for
``--seconds``: to the one model, then half the requests to each by ``?model=``: req/s in all and
per model, p50/p99, the workers' RSS.

Results: ``results/swap-drill-<model>-<topology>.json``, ``results/cache.json`` and
``results/models-<topology>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.load import Request, run_closed_loop, run_loop, run_open_loop
from harness.samples import digit, multipart
from harness.serving import REPO, Server, scrape, serve
from harness.versions import DIGITS_DIR, shifted_digits

__all__ = ["main"]

TOKEN = "drill-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RESULTS = REPO / "results"


def _classify(upload: bytes, kind: str = "classify", model: str = "") -> Request:
    body, content_type = multipart({}, [("image", "d.png", upload)])
    path = f"/classify?model={model}" if model else "/classify"
    return Request(kind, "POST", path, body, (("Content-Type", content_type),))


def _workers(server: Server) -> list[psutil.Process]:
    """The server's worker processes (its arbiter's children)."""
    return psutil.Process(server.process.pid).children(recursive=True)


def _rss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def _versions(model: str, work: Path) -> tuple[str, str]:
    """Version 1's and version 2's sources for ``model``."""
    if model == "digits":
        return f"local-dir:{DIGITS_DIR}", shifted_digits(work / "digits-v2")
    import timm
    import torch
    from safetensors.torch import save_file

    sources = []
    for seed in (0, 1):
        path = work / f"vit-small-{seed}.safetensors"
        if not path.exists():
            torch.manual_seed(seed)
            built = timm.create_model("vit_small_patch16_224", pretrained=False)
            save_file({k: v.contiguous() for k, v in built.state_dict().items()}, str(path))
        sources.append(f"vit_small_patch16_224@{path}")
    return sources[0], sources[1]


def _load(url: str, source: str) -> tuple[int, dict[str, Any], float]:
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/v2/repository/models/{_name(url)}/load",
        json={"parameters": {"source": source}},
        headers=AUTH,
        timeout=900,
    )
    return response.status_code, response.json(), time.perf_counter() - started


def _name(url: str) -> str:
    return str(httpx.get(f"{url}/model", timeout=30).json()["model"]["name"])


def swap(
    model: str, seconds: float, at: float, load: float, work: Path, topology: str = "replicas"
) -> dict[str, Any]:
    v1, v2 = _versions(model, work)
    upload = digit(7, 64, False)
    requests = [_classify(upload)]
    env = {"VIT_TOPOLOGY": topology, "VIT_WORKERS": "2", "VIT_DTYPE": "float32",
           "VIT_ADMIN_TOKEN": TOKEN, "VIT_ACCESS_LOG": "false", "VIT_MODEL": v1}  # fmt: skip
    with serve(env, work, ready_timeout_s=600) as server:
        url = server.url
        capacity = run_loop(run_closed_loop(url, requests, clients=32, duration_s=5)).goodput()
        rate = load * capacity
        workers = _workers(server)
        stop = threading.Event()
        memory: list[tuple[float, float]] = []
        seen: list[tuple[float, str]] = []
        outcome: dict[str, Any] = {}

        def sample() -> None:
            while not stop.is_set():
                memory.append((time.time(), _rss_mib(workers)))
                time.sleep(0.05)

        def observe() -> None:
            while not stop.is_set():
                answer = httpx.post(f"{url}/classify", files={"image": ("d.png", upload)},
                                    timeout=60)  # fmt: skip
                if answer.status_code == 200:
                    seen.append((time.time(), answer.json()["model"]["version"]))

        timeline: list[dict[str, Any]] = []

        async def tick(live: Any, at_s: float) -> None:
            totals = live.summary()["totals"]
            timeline.append({"t": round(time.time(), 3), "good": totals["good"],
                             "refused": totals["answered"] - totals["good"],
                             "dropped": totals["dropped"]})  # fmt: skip

        def drive() -> None:
            outcome["load"] = run_loop(
                run_open_loop(
                    url, requests, rate=rate, duration_s=seconds, tick_s=1.0, on_tick=tick
                )
            )

        threads = [threading.Thread(target=f) for f in (sample, observe, drive)]
        for thread in threads:
            thread.start()
        time.sleep(at)
        called = time.time()
        status, answer, took_s = _load(url, v2)
        returned = time.time()
        time.sleep(min(3.0, max(0.0, seconds - at - took_s - 4)))
        failed_at = time.time()
        failed_status, failed_answer, failed_s = _load(url, "local-dir:/nonexistent/model")
        threads[2].join()
        stop.set()
        for thread in threads[:2]:
            thread.join()
        after_rss = _rss_mib(workers)
    result = outcome["load"]
    totals = result.summary()["totals"]
    failures = (totals["sent"] - totals["good"]) + totals["dropped"] + totals["connect_errors"]
    before = [v for t, v in seen if t < called]
    v1_last = max((t for t, v in seen if v == "1"), default=None)
    v2_first = min((t for t, v in seen if v == "2"), default=None)
    rss_before = statistics.median(m for t, m in memory if t < called)
    seconds_rows = [{**row, "t": round(row["t"] - called, 1)} for row in _per_second(timeline)]
    return {
        "model": model,
        "topology": topology,
        "versions": {"1": v1, "2": v2},
        "capacity_per_s": round(capacity, 1),
        "offered_per_s": round(rate, 1),
        "load": result.summary(),
        "requests": totals["scheduled"],
        "failed": failures,
        "load_call": {"status": status, "answer": answer, "took_s": round(took_s, 3)},
        "observer": {
            "answers": len(seen),
            "all_v1_before_the_call": set(before) <= {"1"},
            "v1_after_the_call_returned": sum(v == "1" for t, v in seen if t > returned),
            "last_v1_after_call_s": None if v1_last is None else round(v1_last - called, 3),
            "first_v2_after_call_s": None if v2_first is None else round(v2_first - called, 3),
        },
        "memory_mib": {
            "before": round(rss_before, 1),
            "peak_during": round(max(m for t, m in memory if called <= t <= returned), 1),
            "after": round(after_rss, 1),
        },
        "per_second": seconds_rows,
        # Refusals while the load call ran (and a second after) against the other seconds
        # at the same offered rate: the swap's own cost, apart from the machine's noise.
        "refused_during_load_call": sum(
            r["refused"] + r["dropped"] for r in seconds_rows if 0 < r["t"] <= took_s + 1
        ),
        "refused_other_seconds": sum(
            r["refused"] + r["dropped"] for r in seconds_rows if not 0 < r["t"] <= took_s + 1
        ),
        "failed_load": {
            "called_after_s": round(failed_at - called, 2),
            "status": failed_status,
            "answer": failed_answer,
            "took_s": round(failed_s, 3),
        },
    }


def _per_second(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cumulative tick counts -> counts per second (``t``: the tick's end)."""
    keys = ("good", "refused", "dropped")
    rows, last = [], dict.fromkeys(keys, 0)
    for row in timeline:
        rows.append({"t": row["t"], **{k: row[k] - last[k] for k in keys}})
        last = row
    return rows


def cache(seconds: float, work: Path) -> dict[str, Any]:
    uploads = [digit(i, 64, i % 2 == 1) for i in range(64)]
    requests = [_classify(upload) for upload in uploads]
    rows: list[dict[str, Any]] = []
    for budget in (0, 16 * 2**20):
        env = {"VIT_TOPOLOGY": "replicas", "VIT_DTYPE": "float32", "VIT_ACCESS_LOG": "false",
               "VIT_CACHE_BYTES": str(budget)}  # fmt: skip
        folder = work / f"cache-{budget}"
        folder.mkdir(parents=True, exist_ok=True)
        with serve(env, folder) as server:
            run_loop(run_closed_loop(server.url, requests, clients=8, duration_s=2))  # warm
            before = scrape(server.url)
            result = run_loop(run_closed_loop(server.url, requests, clients=32, duration_s=seconds))
            after = scrape(server.url)
        hit, miss = (f'vit_cache_lookups_total{{result="{r}"}}' for r in ("hit", "miss"))
        hits = after.get(hit, 0.0) - before.get(hit, 0.0)
        misses = after.get(miss, 0.0) - before.get(miss, 0.0)
        rows.append({
            "cache_bytes": budget,
            "req_per_s": round(result.goodput(), 1),
            "latency_ms": result.percentiles("classify"),
            "failed": result.offered - result.good(),
            "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        })  # fmt: skip
    off, on = rows
    return {"rows": rows, "speedup": round(on["req_per_s"] / off["req_per_s"], 2)}


def models(seconds: float, work: Path, topology: str) -> dict[str, Any]:
    uploads = [digit(i, 64, i % 2 == 1) for i in range(64)]
    sources = {"digits": f"local-dir:{DIGITS_DIR}", "second": shifted_digits(work / "second")}
    rows: list[dict[str, Any]] = []
    for names in (["digits"], ["digits", "second"]):
        env = {"VIT_TOPOLOGY": topology, "VIT_WORKERS": "2", "VIT_DTYPE": "float32",
               "VIT_ACCESS_LOG": "false", "VIT_CACHE_BYTES": "0",
               "VIT_MODELS": ",".join(f"{name}={sources[name]}" for name in names)}  # fmt: skip
        # Interleaved: every client sends to each model in turn.
        requests = [_classify(u, name, name) for u in uploads for name in names]
        folder = work / f"models-{len(names)}-{topology}"
        folder.mkdir(parents=True, exist_ok=True)
        with serve(env, folder) as server:
            run_loop(run_closed_loop(server.url, requests, clients=8, duration_s=2))  # warm
            result = run_loop(run_closed_loop(server.url, requests, clients=32, duration_s=seconds))
            rss = _rss_mib(_workers(server))
        rows.append({
            "models": names,
            "req_per_s": round(result.goodput(), 1),
            "per_model": {name: {"req_per_s": round(result.goodput(name), 1),
                                 "latency_ms": result.percentiles(name)} for name in names},
            "failed": result.offered - result.good(),
            "workers_rss_mib": round(rss, 1),
        })  # fmt: skip
    one, two = rows
    return {"topology": topology, "rows": rows,
            "two_vs_one": round(two["req_per_s"] / one["req_per_s"], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drill", choices=["swap", "cache", "models"])
    parser.add_argument("--model", default="digits", choices=["digits", "vit-small"])
    parser.add_argument("--topology", default="replicas", choices=["replicas", "split"])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--at", type=float, default=8.0, help="when the load call goes out")
    parser.add_argument("--load", type=float, default=0.7, help="share of capacity offered")
    parser.add_argument("--work", type=Path, default=REPO / "results" / "swap-drill-work")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.drill == "swap":
        payload = swap(args.model, args.seconds, args.at, args.load, args.work, args.topology)
        name = f"swap-drill-{args.model}-{args.topology}"
    elif args.drill == "models":
        payload = models(args.seconds, args.work, args.topology)
        name = f"models-{args.topology}"
    else:
        payload = cache(args.seconds, args.work)
        name = "cache"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
