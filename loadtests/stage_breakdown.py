"""Where the time goes: per-stage latency at concurrency 1 and 16, read back from Prometheus.

    python -m loadtests.stage_breakdown              # ~15 s per phase; prints a Markdown table
    python -m loadtests.stage_breakdown --seconds 30 --concurrency 1 8 32

Starts the default service (``bentoml serve``) and a real Prometheus scraping it every second
(Debian's ``prometheus``; the repo's rules loaded), drives ``/classify`` with wrk for each
concurrency in turn, and after each phase reads from Prometheus the mean and p50/p95 of every
``vit_stage_duration_seconds`` stage over exactly that phase's scrapes: ``increase()`` over a
window from the last scrape before the phase to the first after it. Means are exact; p50/p95 are
``histogram_quantile`` interpolations within the service's buckets (0.5, 1, 2, 5, 10, 20, 35 ms,
...), so read them as bucket-resolution estimates. decode/queue/postprocess are per image,
preprocess/forward/attention per batch. Writes ``results/stage-breakdown.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.prometheus import Labels, Prometheus, run_prometheus
from harness.samples import digit, multipart
from harness.serving import serve
from loadtests.bench import RESULTS, drive, machine
from service.metrics import STAGES

__all__ = ["main", "stage_breakdown"]

STAGE_ORDER = STAGES


# --- the breakdown ----------------------------------------------------------------------------


def _by(vector: dict[Labels, float], label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in vector.items()}


def _ms(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value * 1e3, 3)


def phase_stats(prom: Prometheus, start: float, end: float) -> dict[str, Any]:
    """Per-stage and request figures over the scrapes in [start, end] (scrape times)."""
    window = f"{round((end - start + 0.5) * 1e3)}ms"  # half a scrape of slack: has the start sample

    def inc(metric: str, by: str) -> str:
        return f"sum by ({by}) (increase({metric}[{window}]))"

    stage = "vit_stage_duration_seconds"
    sums = _by(prom.vector(inc(f"{stage}_sum", "stage"), end), "stage")
    counts = _by(prom.vector(inc(f"{stage}_count", "stage"), end), "stage")
    quantiles = {
        q: _by(prom.vector(f"histogram_quantile({q}, {inc(f'{stage}_bucket', 'le, stage')})", end),
               "stage")
        for q in (0.5, 0.95)
    }  # fmt: skip
    # increase() extrapolates to the window's edges; ratios (means, quantiles) are unaffected,
    # but the number of observations is read exactly, as the difference of the two scrapes.
    total = f"sum by (stage) ({stage}_count)"
    at_end, at_start = (
        _by(prom.vector(total, end), "stage"),
        _by(prom.vector(total, start), "stage"),
    )
    stages = {}
    for name in sorted(counts, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
        count = counts[name]
        stages[name] = {
            "observations": round(at_end.get(name, 0.0) - at_start.get(name, 0.0)),
            "mean_ms": _ms(sums.get(name, 0.0) / count) if count else None,
            "p50_ms": _ms(quantiles[0.5].get(name)),
            "p95_ms": _ms(quantiles[0.95].get(name)),
        }
    request = "vit_request_duration_seconds"
    r_sum = prom.scalar(f'sum(increase({request}_sum{{endpoint="classify"}}[{window}]))', end)
    r_count = prom.scalar(f'sum(increase({request}_count{{endpoint="classify"}}[{window}]))', end)
    r_q = {
        q: prom.scalar(
            f"histogram_quantile({q}, sum by (le) "
            f'(increase({request}_bucket{{endpoint="classify"}}[{window}])))',
            end,
        )
        for q in (0.5, 0.95)
    }
    b_sum = prom.scalar(f"sum(increase(vit_batch_size_sum[{window}]))", end)
    b_count = prom.scalar(f"sum(increase(vit_batch_size_count[{window}]))", end)
    return {
        "window": {"start": start, "end": end},
        "stages": stages,
        "request": {
            "mean_ms": _ms(r_sum / r_count) if r_sum is not None and r_count else None,
            "p50_ms": _ms(r_q[0.5]),
            "p95_ms": _ms(r_q[0.95]),
        },
        "mean_batch": round(b_sum / b_count, 2) if b_sum is not None and b_count else None,
    }


def stage_breakdown(
    concurrencies: Sequence[int], seconds: float, work: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Serve, scrape, drive each concurrency in turn; per-phase figures from Prometheus."""
    body, content_type = multipart({}, [("image", "digit.png", digit(0, 64, False))])
    server_env = {
        "VIT_ACCESS_LOG": "false",
        **(env or {}),
    }
    phases = []
    with (
        serve(server_env, work) as server,
        run_prometheus(server.url.removeprefix("http://"), work) as prom,
    ):
        url = f"{server.url}/classify"
        drive(url, body, content_type, 2, 2)  # warm the path
        for concurrency in concurrencies:
            start = prom.wait_for_scrape_after(time.time())
            load = drive(url, body, content_type, concurrency, seconds)
            end = prom.wait_for_scrape_after(time.time())
            stats = phase_stats(prom, start, end)
            phase = {"concurrency": concurrency, "client": asdict(load), **stats}
            phases.append(phase)
            print(json.dumps({"concurrency": concurrency, "rps": round(load.rps, 1),
                              "mean_batch": stats["mean_batch"]}), flush=True)  # fmt: skip
    return {"machine": machine(), "seconds": seconds, "phases": phases}


def markdown(result: dict[str, Any]) -> str:
    """Stages down, (concurrency x mean/p50/p95 ms) across."""
    phases = result["phases"]
    head = ["stage"] + [f"c={p['concurrency']} {k}" for p in phases for k in ("mean", "p50", "p95")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(figures: dict[str, Any] | None) -> list[str]:
        figures = figures or {}
        return [
            "" if figures.get(k) is None else f"{figures[k]:.2f}"
            for k in ("mean_ms", "p50_ms", "p95_ms")
        ]

    stages = list(dict.fromkeys(s for p in phases for s in p["stages"]))
    for name in stages:
        unit = "batch" if name in ("preprocess", "forward", "attention") else "image"
        row = [f"{name} (per {unit})"] + [c for p in phases for c in cells(p["stages"].get(name))]
        lines.append("| " + " | ".join(row) + " |")
    row = ["request, server"] + [c for p in phases for c in cells(p["request"])]
    lines.append("| " + " | ".join(row) + " |")
    client = [
        {"mean_ms": None, "p50_ms": p["client"]["p50_ms"], "p95_ms": p["client"]["p95_ms"]}
        for p in phases
    ]
    row = ["request, client (wrk)"] + [c for figures in client for c in cells(figures)]
    lines.append("| " + " | ".join(row) + " |")
    summary = "; ".join(
        f"c={p['concurrency']}: {p['client']['rps']:.0f} req/s, mean batch {p['mean_batch']}, "
        f"{p['client']['errors']} errors"
        for p in phases
    )
    return "\n".join(lines) + f"\n\nAll times in ms. {summary}.\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", type=Path, default=RESULTS / "stage-breakdown.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stage-breakdown-") as folder:
        result = stage_breakdown(args.concurrency, args.seconds, Path(folder))
    table = markdown(result)
    result["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
