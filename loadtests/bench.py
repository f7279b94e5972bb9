"""Benchmarks that print figures and write JSON + Markdown: offline model speed and served speed.

    python -m loadtests.bench offline                 # model alone, images/s per batch and dtype
    python -m loadtests.bench served                  # real bentoml serve, driven by wrk

Served runs start ``bentoml serve`` on a free loopback port per configuration and drive it with
wrk (a light C load generator, so the client does not steal the server's cores); where wrk is
missing (the GPU host), a small asyncio client stands in. Results land in ``results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.serving import REPO, serve

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


def multipart(
    fields: dict[str, str], image: bytes, filename: str = "image.png"
) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field ``image``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{head}{value}\r\n".encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


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
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("vit_batch_size_sum ", "vit_batch_size_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("vit_batch_size_sum", 0.0), values.get("vit_batch_size_count", 0.0)


def measure(url: str, body: bytes, content_type: str, concurrency: int, seconds: float) -> Load:
    """Drive one load and read the mean batch size it produced."""
    images_before, batches_before = batch_counters(url)
    load = drive(f"{url}/classify", body, content_type, concurrency, seconds)
    images_after, batches_after = batch_counters(url)
    batches = batches_after - batches_before
    mean_batch = (images_after - images_before) / batches if batches else None
    return Load(**{**asdict(load), "mean_batch": mean_batch})


# --- suites ---------------------------------------------------------------------------------


def digit_png(size: int = 64) -> bytes:
    """A held-out digit as PNG."""
    from models.digits import load_split, render_digit

    buffer = io.BytesIO()
    render_digit(load_split().X_test[0], size).save(buffer, format="PNG")
    return buffer.getvalue()


def photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A synthetic photo-like JPEG (smooth gradients plus noise, quality 85)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * xx / width, 255 * yy / height, 128 + 60 * np.sin(xx / 37)], axis=-1)
    pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def random_vit_small(folder: Path) -> str:
    """vit_small_patch16_224 with random weights saved locally; returns its source string."""
    import timm
    import torch
    from safetensors.torch import save_file

    path = folder / "vit_small_patch16_224-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch16_224", pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"vit_small_patch16_224@{path}"


def served_suite(
    configs: Sequence[dict[str, Any]], seconds: float, log_dir: Path
) -> list[dict[str, Any]]:
    """Per config {name, env, image, fields, concurrency: [...]}: serve, drive each load."""
    rows = []
    for config in configs:
        with serve(config["env"], log_dir) as server:
            body, content_type = multipart(config.get("fields", {}), config["image"])
            # Warm the path (first multipart parse, allocator) before timing.
            drive(f"{server.url}/classify", body, content_type, 2, 2)
            for concurrency in config["concurrency"]:
                load = measure(server.url, body, content_type, concurrency, seconds)
                row = {"config": config["name"], **asdict(load)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


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


def gpu_suite(seconds: float, work: Path, quick: bool, arch: str, device: str) -> int:
    """A ViT (random weights; vit_base_patch16_224 by default) in bf16 on CUDA: offline ceiling
    and served loads with batching on/off, attention modes, several workers, recovery."""
    import timm
    import torch
    from safetensors.torch import save_file

    path = work / f"{arch}-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    source = f"{arch}@{path}"
    rates = offline_throughput(source, "bfloat16", (1, 32, 64, 128), device=device, seconds=3)
    offline = {f"b{b}": r for b, r in rates.items()}
    print(json.dumps({"offline": offline}), flush=True)
    photo = photo_jpeg()
    env = {
        "VIT_MODEL": source,
        "VIT_DTYPE": "bfloat16",
        "VIT_DEVICE": device,
        "VIT_ACCESS_LOG": "false",
        "VIT_MAX_BATCH_SIZE": "64",
        "VIT_MAX_WAIT_MS": "2",
    }
    levels = [1, 8] if quick else [1, 8, 32, 64]
    # (name, environment, attention mode, concurrency levels)
    configs = [
        ("batching on, cls", env, "cls", levels),
        ("batching off, cls", {**env, "VIT_MAX_BATCH_SIZE": "1"}, "cls", levels),
        ("batching on, none", env, "none", [32]),
        ("batching on, rollout", env, "rollout", [32]),
        ("4 workers, cls", {**env, "VIT_WORKERS": "4"}, "cls", [64]),
    ]
    if quick:
        configs = configs[:2]
    rows: list[dict[str, Any]] = []
    recovered: dict[str, float] = {}
    for name, config_env, mode, concurrencies in configs:
        body, content_type = multipart({"attention": mode}, photo)
        with serve(config_env, work, ready_timeout_s=300) as server:
            drive(f"{server.url}/classify", body, content_type, 4, 2)
            for concurrency in concurrencies:
                load = measure(server.url, body, content_type, concurrency, seconds)
                row = {"config": name, **asdict(load)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if name == "batching on, cls":
                recovered = recovery(server.url, body, content_type, seconds)
                print(json.dumps({"recovery": recovered}), flush=True)
    columns = ["config", "concurrency", "rps", "p50_ms", "p95_ms", "errors", "mean_batch"]
    table = (
        "Offline (images/s): "
        + ", ".join(f"batch {k[1:]}: {v:.0f}" for k, v in offline.items())
        + "\n\n"
        + markdown(rows, columns)
        + f"\nRecovery: {json.dumps(recovered)}\n"
    )
    write("bench-gpu", {"machine": machine(), "offline": offline, "rows": rows,
                        "recovery": recovered}, table)  # fmt: skip
    return 0


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
    parser.add_argument("suite", choices=["offline", "served", "gpu"])
    parser.add_argument("--seconds", type=float, default=8.0, help="per load (served)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--arch", default="vit_base_patch16_224", help="gpu suite's model")
    args = parser.parse_args(argv)
    work = RESULTS / "work"
    work.mkdir(parents=True, exist_ok=True)
    vit_s = random_vit_small(work)

    if args.suite == "gpu":
        device = "cuda" if args.device == "auto" else args.device
        return gpu_suite(args.seconds, work, args.quick, args.arch, device)
    if args.suite == "offline":
        rows = []
        for source, name in ((DEFAULT_MODEL, "vit-digits"), (vit_s, "vit_small_patch16_224")):
            for dtype in ("float32", "bfloat16"):
                rates = offline_throughput(source, dtype, (1, 16, 32), device=args.device)
                row = {"model": name, "dtype": dtype, **{f"b{b}": r for b, r in rates.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
        write(
            "bench-offline",
            {"machine": machine(), "rows": rows},
            markdown(rows, ["model", "dtype", "b1", "b16", "b32"]),
        )
        return 0

    digit, photo = digit_png(), photo_jpeg()
    base_env = {"VIT_ACCESS_LOG": "false", "VIT_DEVICE": args.device}
    configs: list[dict[str, Any]] = []
    for mode in ("none", "cls", "rollout"):
        configs.append({
            "name": f"vit-digits attention={mode}",
            "env": base_env,
            "image": digit,
            "fields": {"attention": mode},
            "concurrency": [1, 16],
        })  # fmt: skip
    for dtype in ("float32", "bfloat16"):
        configs.append({
            "name": f"vit_small {dtype} attention=cls",
            "env": {**base_env, "VIT_MODEL": vit_s, "VIT_DTYPE": dtype},
            "image": photo,
            "fields": {"attention": "cls"},
            "concurrency": [1, 16],
        })  # fmt: skip
    if args.quick:
        configs = configs[:1]
    rows = served_suite(configs, args.seconds, work)
    columns = ["config", "concurrency", "rps", "p50_ms", "p95_ms", "errors", "mean_batch"]
    write("bench-served", {"machine": machine(), "rows": rows}, markdown(rows, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
