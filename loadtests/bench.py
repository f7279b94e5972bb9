"""Benchmarks that print figures and write JSON + Markdown: the model alone against the service.

    python -m loadtests.bench cpu      # make bench: default model and ViT-S/16, fp32 and bf16
    python -m loadtests.bench quick    # one small plan, to check the machinery
    python -m loadtests.bench gpu      # vit_base_patch16_224, bf16, CUDA (loadtests/gpu_check.sh)

Each plan measures the offline ceiling (images/s of the model alone at batch 1 and the maximum
batch), then served loads at several concurrencies with batching on and off, the attention modes,
and recovery after a burst; the summary gives served/offline at saturation, the batching gain and
the per-request overhead at concurrency 1 (served p50 minus the offline batch-1 time).

Served runs start ``bentoml serve`` on a free loopback port per configuration and drive it with
wrk (a light C load generator, so the client does not steal the server's cores); where wrk is
missing (the GPU host), a small asyncio client stands in. Results land in ``results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.samples import digit, multipart, photo
from loadtests.serving import REPO, scrape, serve

__all__ = ["Load", "drive", "machine", "main", "offline_throughput"]

RESULTS = REPO / "results"
DEFAULT_MODEL = f"local-dir:{REPO / 'models' / 'vit-digits'}"


@dataclass(frozen=True)
class Load:
    """One driven load: what was asked and what came back."""

    concurrency: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float | None = None


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return info


# --- offline --------------------------------------------------------------------------------


def offline_throughput(
    source: str,
    dtype: str,
    batch_sizes: Sequence[int],
    device: str = "auto",
    seconds: float = 4.0,
) -> dict[int, float]:
    """Images/s of the model alone (preprocessed input already on the device)."""
    import torch

    from service.loading import load_model

    loaded = load_model(source, device=device, dtype=dtype)
    model, info = loaded.model, loaded.info
    param = next(model.parameters())
    rates = {}
    for batch in batch_sizes:
        x = torch.randn(batch, *info.input_size, device=param.device, dtype=param.dtype)
        with torch.inference_mode():
            model(x)
            _sync(param.device)
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < seconds or images < 2 * batch:
                model(x)
                images += batch
            _sync(param.device)
        rates[batch] = images / (time.perf_counter() - started)
    return rates


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- load generation --------------------------------------------------------------------------


_WRK_SCRIPT = """
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{content_type}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "socket_errors": %d, "non2xx": %d, "duration_us": %d, '
    .. '"p50": %f, "p95": %f, "p99": %f}}\\n',
    summary.requests, e.connect + e.read + e.write + e.timeout, e.status, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def drive(url: str, body: bytes, content_type: str, concurrency: int, seconds: float) -> Load:
    """POST ``body`` to ``url`` from ``concurrency`` connections for ``seconds``."""
    if shutil.which("wrk"):
        return _drive_wrk(url, body, content_type, concurrency, seconds)
    return asyncio.run(_drive_async(url, body, content_type, concurrency, seconds))


def _drive_wrk(url: str, body: bytes, content_type: str, concurrency: int, seconds: float) -> Load:
    with tempfile.TemporaryDirectory() as folder:
        body_path = Path(folder) / "body.bin"
        body_path.write_bytes(body)
        script = Path(folder) / "post.lua"
        script.write_text(_WRK_SCRIPT.format(body=body_path, content_type=content_type))
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "60s",
             "-s", str(script), url],
            capture_output=True, text=True, check=True, timeout=seconds + 120,
        ).stdout  # fmt: skip
    match = re.search(r"WRKJSON (\{.*\})", out)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data = json.loads(match.group(1))
    duration = data["duration_us"] / 1e6
    return Load(
        concurrency=concurrency,
        seconds=round(duration, 2),
        requests=data["requests"],
        errors=data["socket_errors"] + data["non2xx"],
        rps=data["requests"] / duration,
        p50_ms=data["p50"] / 1e3,
        p95_ms=data["p95"] / 1e3,
        p99_ms=data["p99"] / 1e3,
    )


async def _drive_async(
    url: str, body: bytes, content_type: str, concurrency: int, seconds: float
) -> Load:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": content_type}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    return Load(concurrency, round(duration, 2), len(latencies), errors,
                len(latencies) / duration, pct(0.5), pct(0.95), pct(0.99))  # fmt: skip


def batch_counters(url: str) -> tuple[float, float]:
    """(images batched, batches run) so far, from the service's /metrics."""
    series = scrape(url)
    return series["vit_batch_size_sum"], series["vit_batch_size_count"]


def measure(url: str, body: bytes, content_type: str, concurrency: int, seconds: float) -> Load:
    """Drive one load and read the mean batch size it produced."""
    images_before, batches_before = batch_counters(url)
    load = drive(f"{url}/classify", body, content_type, concurrency, seconds)
    images_after, batches_after = batch_counters(url)
    batches = batches_after - batches_before
    mean_batch = (images_after - images_before) / batches if batches else None
    return Load(**{**asdict(load), "mean_batch": mean_batch})


# --- suites ---------------------------------------------------------------------------------


def recovery(url: str, body: bytes, content_type: str, seconds: float) -> dict[str, float]:
    """1-client p50 before and after a 32-client burst (goal: after within 1.5x of before)."""
    before = drive(f"{url}/classify", body, content_type, 1, seconds)
    burst = drive(f"{url}/classify", body, content_type, 32, seconds)
    after = drive(f"{url}/classify", body, content_type, 1, seconds)
    return {
        "p50_before_ms": before.p50_ms,
        "burst_rps": burst.rps,
        "burst_errors": burst.errors,
        "p50_after_ms": after.p50_ms,
        "ratio": after.p50_ms / before.p50_ms if before.p50_ms else float("nan"),
    }


@dataclass(frozen=True)
class Plan:
    """What to measure for one model and dtype."""

    label: str
    source: str
    upload: bytes
    dtype: str
    device: str
    levels: tuple[int, ...] = (1, 8, 32, 64)
    batching_off: bool = True
    attention_modes: bool = True
    recovery: bool = True
    max_batch: int = 32
    extra_env: tuple[tuple[str, str], ...] = ()


def run_plan(plan: Plan, seconds: float, work: Path) -> dict[str, Any]:
    """Offline ceiling, then served loads for one plan; rows plus the summary figures."""
    offline = offline_throughput(
        plan.source, plan.dtype, sorted({1, plan.max_batch}), device=plan.device
    )
    print(json.dumps({"plan": plan.label, "offline": offline}), flush=True)
    env = {
        "VIT_MODEL": plan.source,
        "VIT_DTYPE": plan.dtype,
        "VIT_DEVICE": plan.device,
        "VIT_ACCESS_LOG": "false",
        "VIT_MAX_BATCH_SIZE": str(plan.max_batch),
        **dict(plan.extra_env),
    }
    saturation = max(plan.levels)
    # (config, environment, attention mode, concurrency levels)
    configs: list[tuple[str, dict[str, str], str, Sequence[int]]] = [
        ("batching on", env, "cls", plan.levels)
    ]
    if plan.batching_off:
        configs.append(("batching off", {**env, "VIT_MAX_BATCH_SIZE": "1"}, "cls", plan.levels))
    if plan.attention_modes:
        configs += [(f"attention {m}", env, m, [saturation]) for m in ("none", "rollout")]
    rows: list[dict[str, Any]] = []
    recovered: dict[str, float] = {}
    for name, config_env, mode, levels in configs:
        body, content_type = multipart({"attention": mode}, [("image", "upload", plan.upload)])
        with serve(config_env, work, ready_timeout_s=300) as server:
            drive(f"{server.url}/classify", body, content_type, 2, 2)  # warm the path
            for concurrency in levels:
                load = measure(server.url, body, content_type, concurrency, seconds)
                row = {"plan": plan.label, "config": name, "attention": mode, **asdict(load)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if name == "batching on" and plan.recovery:
                recovered = recovery(server.url, body, content_type, seconds)
                print(json.dumps({"plan": plan.label, "recovery": recovered}), flush=True)
    on = [r["rps"] for r in rows if r["config"] == "batching on"]
    off = [r["rps"] for r in rows if r["config"] == "batching off"]
    c1 = next(r for r in rows if r["config"] == "batching on" and r["concurrency"] == 1)
    ceiling = offline[plan.max_batch]
    summary = {
        "plan": plan.label,
        "offline_b1": offline[1],
        "offline_ceiling": ceiling,
        "served_saturation": max(on),
        "served_over_offline": max(on) / ceiling,
        "batching_gain": max(on) / max(off) if off and max(off) else None,
        "overhead_c1_ms": c1["p50_ms"] - 1e3 / offline[1] if c1["requests"] else None,
        "recovery_ratio": recovered.get("ratio"),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return {"plan": asdict(plan) | {"upload": len(plan.upload)}, "offline": offline,
            "rows": rows, "recovery": recovered, "summary": summary}  # fmt: skip


def report(name: str, results: list[dict[str, Any]]) -> None:
    """Write results/<name>.json and a Markdown report with the rows and the summary."""
    rows = [row for result in results for row in result["rows"]]
    summaries = [result["summary"] for result in results]
    columns = ["plan", "config", "concurrency", "rps", "p50_ms", "p95_ms", "errors", "mean_batch"]
    summary_columns = [
        "plan",
        "offline_b1",
        "offline_ceiling",
        "served_saturation",
        "served_over_offline",
        "batching_gain",
        "overhead_c1_ms",
        "recovery_ratio",
    ]
    table = (
        markdown(summaries, summary_columns) + "\n" + markdown(rows, columns)
        + "\nRecovery (1-client p50 before/after a 32-client burst):\n\n"
        + "".join(f"- {r['plan']['label']}: {json.dumps(r['recovery'])}\n" for r in results)
    )  # fmt: skip
    write(name, {"machine": machine(), "results": results}, table)


def random_checkpoint(arch: str, folder: Path) -> str:
    """``arch`` with random weights saved locally as safetensors; returns its source string."""
    import timm
    import torch
    from safetensors.torch import save_file

    path = folder / f"{arch}-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"{arch}@{path}"


def write(name: str, payload: dict[str, Any], table: str) -> None:
    """Write results/<name>.json and results/<name>.md."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


def markdown(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of the given columns."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=["cpu", "gpu", "quick"])
    parser.add_argument("--seconds", type=float, default=10.0, help="per load")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="vit_base_patch16_224", help="the gpu suite's model")
    args = parser.parse_args(argv)
    work = RESULTS / "work"
    work.mkdir(parents=True, exist_ok=True)
    digit_png, photo_jpeg = digit(0, 64, False), photo(640, 480)
    device = args.device
    if args.suite == "gpu":
        device = "cuda" if device == "auto" else device
        source = random_checkpoint(args.arch, work)
        plan = Plan(args.arch, source, photo_jpeg, "bfloat16", device, max_batch=64)
        workers = Plan(f"{args.arch} x4 workers", source, photo_jpeg, "bfloat16", device,
                       levels=(1, 64), batching_off=False, attention_modes=False,
                       recovery=False, max_batch=64, extra_env=(("VIT_WORKERS", "4"),))  # fmt: skip
        report("bench-gpu", [run_plan(plan, args.seconds, work),
                             run_plan(workers, args.seconds, work)])  # fmt: skip
        return 0
    vit_s = random_checkpoint("vit_small_patch16_224", work)
    if args.suite == "quick":
        plans = [Plan("vit-digits fp32", DEFAULT_MODEL, digit_png, "float32", device,
                      levels=(1, 16), attention_modes=False)]  # fmt: skip
    else:
        plans = [
            Plan("vit-digits fp32", DEFAULT_MODEL, digit_png, "float32", device),
            Plan("vit-digits bf16", DEFAULT_MODEL, digit_png, "bfloat16", device,
                 levels=(1, 32), batching_off=False, attention_modes=False, recovery=False),
            Plan("vit_small fp32", vit_s, photo_jpeg, "float32", device),
            # bf16 is emulated on CPUs without AMX (~1.5 images/s for ViT-S): one client only.
            Plan("vit_small bf16", vit_s, photo_jpeg, "bfloat16", device, levels=(1,),
                 batching_off=False, attention_modes=False, recovery=False),
        ]  # fmt: skip
    report(f"bench-{args.suite}", [run_plan(plan, args.seconds, work) for plan in plans])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
