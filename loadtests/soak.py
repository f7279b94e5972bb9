"""``make soak``: a real ``bentoml serve`` under open-loop load; leaks and wrong answers fail it.

    python -m loadtests.soak                 # make soak: 10 minutes -> results/soak.json
    python -m loadtests.soak --minutes 1     # a quick check

1. Start ``bentoml serve`` of the default model, default settings, access log off.
2. Capacity: a closed loop (16 clients, 20 s) of the same mix as the soak (below); the requests
   per second it answers, each as expected.
3. Soak: an open loop (``harness/load.py``, Poisson arrivals) at 80 % of that capacity for
   ``--minutes``, a fixed mix: 80 % good ``/classify``, 8 % ``/classify_batch`` of 4 digits, 12 %
   bad requests, each with the exact status and error code it must get (undecodable or
   unsupported bytes, a degenerate image, unknown option values, one image too many).
4. Every minute: the RSS of every server process (the arbiter and its workers, from the
   server's process tree), the number of series in ``/metrics``, and the counts so far.

Pass/fail, printed and written to ``results/soak.json`` (exit 1 if any fails):

- no unexpected answer: every good request a 200, every bad one exactly its 4xx and error code
  in a JSON body; no 5xx, no reset, no timeout, no connect error;
- the generator offered the load: nothing dropped for want of a connection, arrivals handled at
  >= 95 % of the target rate;
- RSS growth < 10 % for every server process (the same processes) from the end of the first
  minute (warm-up) to the end;
- the ``/metrics`` series count constant from the end of the first minute to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.load import (
    NO_ERROR_BODY,
    Request,
    Result,
    run_closed_loop,
    run_loop,
    run_open_loop,
)
from harness.samples import bad_samples, digit, multipart
from harness.serving import REPO, Server, serve

__all__ = ["Expected", "judge", "main", "mix", "probe"]

RESULTS = REPO / "results"
RSS_GROWTH_LIMIT = 0.10
MIN_DISPATCH_SHARE = 0.95

# The error code each of harness.samples.bad_samples() must get (a sample not listed here
# must still get its status and some JSON error code).
_SAMPLE_CODES = {
    "bad: truncated JPEG": "corrupt_image",
    "bad: empty": "empty_image",
    "bad: not an image": "unsupported_media_type",
    "bad: TIFF": "unsupported_media_type",
    "bad: degenerate": "degenerate_image",
}
_GOOD_SHARE, _BATCH_SHARE, _BAD_SHARE = 80.0, 8.0, 12.0


@dataclass(frozen=True)
class Expected:
    """The answer a kind of request must get: a status and, for errors, the JSON error code."""

    status: int
    code: str | None = ""
    """``""`` for a 2xx; ``None``: any JSON error code."""

    def matches(self, status: int, code: str) -> bool:
        """Whether an answer is this one."""
        if status != self.status:
            return False
        if self.code is None:
            return bool(code) and code != NO_ERROR_BODY
        return code == self.code


_Files = list[tuple[str, str, bytes]]


def _upload(kind: str, path: str, files: _Files, weight: float, **fields: str) -> Request:
    body, content_type = multipart(fields, files)
    return Request(kind, "POST", path, body, (("Content-Type", content_type),), weight)


def mix(max_images: int) -> tuple[list[Request], dict[str, Expected]]:
    """The soak's requests (weights in percent) and the answer each kind must get."""
    digits = [digit(i, 64, False) for i in range(4)]
    one = [("image", "digit0.png", digits[0])]
    batch = [("images", f"digit{i}.png", data) for i, data in enumerate(digits)]
    too_many = [("images", f"d{i}.png", digits[i % 4]) for i in range(max_images + 1)]
    # (kind, path, files, form fields, the answer it must get)
    bad: list[tuple[str, str, _Files, dict[str, str], Expected]] = [
        (s.name, "/classify", [("image", s.filename, s.data)], {},
         Expected(s.status, _SAMPLE_CODES.get(s.name)))
        for s in bad_samples()
    ]  # fmt: skip
    bad += [
        ("bad: attention=sideways", "/classify", one, {"attention": "sideways"},
         Expected(422, "invalid_attention")),
        ("bad: top_k=0", "/classify", one, {"top_k": "0"}, Expected(422, "invalid_top_k")),
        (f"bad: {max_images + 1} images", "/classify_batch", too_many, {},
         Expected(413, "too_many_images")),
    ]  # fmt: skip
    requests = [
        _upload("classify", "/classify", [("image", f"digit{i}.png", data)], _GOOD_SHARE / 4)
        for i, data in enumerate(digits)
    ]
    requests.append(_upload("classify_batch", "/classify_batch", batch, _BATCH_SHARE))
    expected = {"classify": Expected(200), "classify_batch": Expected(200)}
    for kind, path, files, fields, answer in bad:
        requests.append(_upload(kind, path, files, _BAD_SHARE / len(bad), **fields))
        expected[kind] = answer
    return requests, expected


def judge(result: Result, expected: dict[str, Expected]) -> dict[str, Any]:
    """Every answer against what its kind must get, and every request that got no answer."""
    unexpected: list[dict[str, Any]] = [
        {
            "kind": kind,
            "status": status,
            "code": code,
            "count": n,
            "expected": f"{expected[kind].status} {expected[kind].code or ''}".rstrip(),
        }
        for (kind, status, code), n in sorted(result.answered.items())
        if not expected[kind].matches(status, code)
    ]
    failures = {
        "unexpected_answers": sum(item["count"] for item in unexpected),
        "server_errors_5xx": sum(n for (_, s, _), n in result.answered.items() if s >= 500),
        "resets": sum(result.resets.values()),
        "timeouts": sum(result.timeouts.values()),
        "protocol_errors": sum(result.protocol_errors.values()),
        "connect_errors": sum(result.connect_errors.values()),
    }
    return {"pass": not any(failures.values()), **failures, "unexpected": unexpected}


def probe(server: Server) -> dict[str, Any]:
    """RSS of every process in the server's tree, and the series ``/metrics`` exposes."""
    root = psutil.Process(server.process.pid)
    processes = []
    for process in [root, *root.children(recursive=True)]:
        try:
            processes.append(
                {
                    "pid": process.pid,
                    "role": _role(process, root),
                    "rss_mib": round(process.memory_info().rss / 2**20, 1),
                }
            )
        except psutil.NoSuchProcess:
            continue
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    series = sorted(
        line.rpartition(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    )
    return {"processes": processes, "series": series}


def _role(process: psutil.Process, root: psutil.Process) -> str:
    if process.pid == root.pid:
        return "arbiter"
    command = process.cmdline()
    if "--worker-id" in command:
        return f"worker {command[command.index('--worker-id') + 1]}"
    return " ".join(command[1:3]) or process.name()


def _counts(result: Result, expected: dict[str, Expected]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for (_, status, _), n in sorted(result.answered.items()):
        statuses[str(status)] = statuses.get(str(status), 0) + n
    verdict = judge(result, expected)
    return {
        "sent": result.offered,
        "good": result.good(),
        "by_status": statuses,
        "dropped": sum(result.dropped.values()),
        **{key: value for key, value in verdict.items() if key not in ("pass", "unexpected")},
    }


def _sample(
    at_s: float,
    probed: dict[str, Any],
    counts: dict[str, Any] | None = None,
    latency_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "at_s": at_s,
        "rss_mib": {f"{p['role']} ({p['pid']})": p["rss_mib"] for p in probed["processes"]},
        "rss_total_mib": round(sum(p["rss_mib"] for p in probed["processes"]), 1),
        "metrics_series": len(probed["series"]),
        **({"counts": counts} if counts is not None else {}),
        **({"classify_latency_ms": latency_ms} if latency_ms is not None else {}),
    }


def _print_sample(sample: dict[str, Any]) -> None:
    rss = ", ".join(f"{name} {mib:.0f}" for name, mib in sample["rss_mib"].items())
    counts = sample.get("counts")
    line = (
        f"  t={sample['at_s']:>5.0f} s  RSS MiB: {rss}  /metrics series: {sample['metrics_series']}"
    )
    if counts:
        line += (
            f"\n            sent {counts['sent']:,}, 200 {counts['good']:,}, "
            f"unexpected {counts['unexpected_answers']}, resets {counts['resets']}, "
            f"timeouts {counts['timeouts']}, dropped {counts['dropped']}, "
            f"classify p50/p99 {sample['classify_latency_ms'].get('p50')}/"
            f"{sample['classify_latency_ms'].get('p99')} ms"
        )
    print(line, flush=True)


def rss_growth(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Per server process, RSS growth from ``first`` to ``last`` (probes); pass if all < 10 %."""
    before = {p["pid"]: p for p in first["processes"]}
    after = {p["pid"]: p for p in last["processes"]}
    rows = []
    for pid, start in before.items():
        end = after.get(pid)
        growth = None if end is None else end["rss_mib"] / start["rss_mib"] - 1
        rows.append(
            {
                "pid": pid,
                "role": start["role"],
                "start_mib": start["rss_mib"],
                "end_mib": None if end is None else end["rss_mib"],
                "growth": None if growth is None else round(growth, 4),
            }
        )
    total_before = sum(p["rss_mib"] for p in before.values())
    total_after = sum(p["rss_mib"] for p in after.values())
    same = before.keys() == after.keys()
    ok = same and all(row["growth"] < RSS_GROWTH_LIMIT for row in rows)
    return {
        "pass": ok,
        "limit": RSS_GROWTH_LIMIT,
        "same_processes": same,
        "processes": rows,
        "total": {
            "start_mib": round(total_before, 1),
            "end_mib": round(total_after, 1),
            "growth": round(total_after / total_before - 1, 4),
        },
    }


def series_constant(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether ``/metrics`` exposed the same number of series in every probe."""
    counts = [len(p["series"]) for p in probes]
    first, last = set(probes[0]["series"]), set(probes[-1]["series"])
    return {
        "pass": len(set(counts)) == 1,
        "counts": counts,
        "added": sorted(last - first)[:50],
        "removed": sorted(first - last)[:50],
    }


async def _soak(
    server: Server,
    requests: list[Request],
    expected: dict[str, Expected],
    rate: float,
    minutes: float,
    tick_s: float,
    samples: list[dict[str, Any]],
    probes: list[dict[str, Any]],
) -> Result:
    seen = {"classify": 0}

    async def tick(result: Result, at: float) -> None:
        counts = _counts(result, expected)
        latency = result.percentiles("classify", start=seen["classify"])
        seen["classify"] = len(result.latencies["classify"])
        probed = await asyncio.to_thread(probe, server)
        probes.append(probed)
        samples.append(_sample(at, probed, counts, latency))
        _print_sample(samples[-1])

    return await run_open_loop(
        server.url, requests, rate=rate, duration_s=minutes * 60, tick_s=tick_s, on_tick=tick
    )


def _shares(requests: list[Request]) -> dict[str, float]:
    shares: dict[str, float] = {}
    for request in requests:
        shares[request.kind] = shares.get(request.kind, 0.0) + request.weight
    return shares


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Serve, measure capacity, soak, judge; the report."""
    log_dir = args.out.parent / "soak"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {"VIT_ACCESS_LOG": "false"}
    started = time.time()
    print(f"Starting bentoml serve (log in {log_dir}) ...", flush=True)
    with serve(env, log_dir) as server:
        model = httpx.get(f"{server.url}/model", timeout=30).json()
        requests, expected = mix(int(model["batching"]["max_images_per_request"]))
        print(
            f"Capacity: closed loop, {args.capacity_clients} clients, "
            f"{args.capacity_seconds:g} s of the soak's mix ...",
            flush=True,
        )
        capacity = run_loop(
            run_closed_loop(
                server.url,
                requests,
                clients=args.capacity_clients,
                duration_s=args.capacity_seconds,
            )
        )
        capacity_verdict = judge(capacity, expected)
        ceiling = sum(capacity.answered.values()) / capacity.duration_s
        print(
            f"  {ceiling:,.0f} requests/s answered as expected; /classify p50/p99 "
            f"{capacity.percentiles('classify').get('p50')}/"
            f"{capacity.percentiles('classify').get('p99')} ms, "
            f"generator CPU {capacity.cpu_s / capacity.elapsed_s:.2f} cores",
            flush=True,
        )
        if ceiling <= 0 or not capacity_verdict["pass"]:
            raise SystemExit(f"capacity run failed: {json.dumps(capacity.summary())[:2000]}")
        rate = args.load * ceiling
        print(
            f"Soak: open loop at {rate:,.0f} requests/s ({args.load:.0%} of capacity) for "
            f"{args.minutes:g} min; one sample every {args.sample_seconds:g} s",
            flush=True,
        )
        start_probe = probe(server)  # also puts /metrics' own series in place before minute 1
        samples = [_sample(0.0, start_probe)]
        _print_sample(samples[0])
        probes: list[dict[str, Any]] = []
        result = run_loop(
            _soak(
                server, requests, expected, rate, args.minutes, args.sample_seconds, samples, probes
            )
        )
        log_tail = server.log_text()[-3000:]
    verdict = judge(result, expected)
    dropped = sum(result.dropped.values())
    load = {
        "pass": dropped == 0 and result.dispatch_rate >= MIN_DISPATCH_SHARE * rate,
        "target_rate": round(rate, 1),
        "dispatch_rate": round(result.dispatch_rate, 1),
        "dropped": dropped,
        "late_sends": result.late_sends,
        "send_lag_max_ms": round(result.send_lag_max_s * 1e3, 1),
    }
    criteria = {
        "no_unexpected_answers": verdict,
        "load_offered": load,
        "rss_growth": rss_growth(probes[0], probes[-1]),
        "metrics_series_constant": series_constant(probes),
    }
    return {
        "pass": all(c["pass"] for c in criteria.values()),
        "criteria": criteria,
        "settings": {
            "minutes": args.minutes,
            "load": args.load,
            "capacity_clients": args.capacity_clients,
            "capacity_seconds": args.capacity_seconds,
            "sample_seconds": args.sample_seconds,
            "env": env,
            "mix_percent": {k: round(w, 2) for k, w in _shares(requests).items()},
            "expected": {k: f"{e.status} {e.code or ''}".rstrip() for k, e in expected.items()},
        },
        "machine": _machine(),
        "capacity": {"answered_per_s": round(ceiling, 1), **capacity.summary()},
        "soak": result.summary(),
        "samples": samples,
        "wall_s": round(time.time() - started, 1),
        "server_log_tail": log_tail,
    }


def _print_report(report: dict[str, Any], out: Path) -> None:
    print("\nCriteria:")
    for name, criterion in report["criteria"].items():
        detail = {
            k: v for k, v in criterion.items() if k not in ("pass", "processes", "unexpected")
        }
        print(f"  {'PASS' if criterion['pass'] else 'FAIL'}  {name}: {json.dumps(detail)}")
        for item in criterion.get("unexpected", [])[:20]:
            print(f"        {item}")
        for row in criterion.get("processes", []):
            print(f"        {row}")
    print(f"\n{'PASS' if report['pass'] else 'FAIL'}; written to {out}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 0 if every criterion passes, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of measured capacity")
    parser.add_argument("--capacity-clients", type=int, default=16)
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="between samples")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    if args.minutes * 60 < args.sample_seconds:
        parser.error("--minutes must cover at least one sample (--sample-seconds)")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report, args.out)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
