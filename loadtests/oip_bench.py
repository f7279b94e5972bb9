"""Ours beside Triton Inference Server on the Open Inference Protocol: ``make bench``'s protocol
plan (``make bench-oip`` alone).

    python -m loadtests.oip_bench                     # 3 rounds of 8 s loads
    python -m loadtests.oip_bench --rounds 1 --seconds 4

Servers, all started first and left up (an idle server costs little CPU), each with one model
instance per core and batches of up to 32 images:

- **ours**, ``bentoml serve`` of the default model as shipped;
- **Triton (PyTriton)** and **Triton (tritonserver)**, the real ``tritonserver`` binary from the
  ``nvidia-pytriton`` wheel with its dynamic batcher (5 ms), serving the same checkpoint through
  PyTriton or through a plain model repository for its Python backend
  (``loadtests/triton_peer.py``; ``make triton-env`` makes its venv). For each protocol and load
  the faster of the two is Triton's figure.

The request is the same for every server: one 64x64 PNG digit as the ``image`` tensor (``BYTES
[1, 1]``), the ``probabilities`` output asked for. Over HTTP it is Triton's binary tensor
extension (the JSON header, then the length-prefixed PNG), driven by wrk; over gRPC it is one
serialized ``ModelInferRequest`` (``raw_input_contents``) in a gRPC frame, driven by ``h2load``
(Debian's ``nghttp2-client``: a C load client, one HTTP/2 connection per client, one call in
flight on each). Ours' ``/classify`` gets the same PNG as a multipart upload with
``attention=none``, the work the protocol request asks for.

h2load counts HTTP 200s, and a failed gRPC call is an HTTP 200 with a ``grpc-status`` trailer, so
every load is checked against the server's own counters, read before and after it: ours'
``vit_requests_total`` of the endpoint by status, Triton's ``nv_inference_request_success`` and
``_failure``. A load passes when the server failed nothing and answered at least what the
client counted, with at most one call per connection more, answered or cancelled: those in
flight when the client stopped (Triton counts a cancelled call as a failure with reason
``CANCELED``; those are reported apart).

Before the loads, the request is sent to every server once and the answers compared (the same
top class; the largest difference in probability is reported).

Rounds interleave the servers (identical runs differ by +-15 % on a small noisy machine): the
table gives each load's median over the rounds, and the ratios the issue's targets are set on.
Writes ``results/bench-oip.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2 as pb

from harness.samples import digit, multipart
from harness.serving import Server, parse_exposition, scrape, serve, serve_triton
from loadtests.bench import RESULTS, Load, drive_wrk, machine, markdown, write
from loadtests.triton_peer import MODEL_NAME
from service.runtime.settings import DEFAULT_MODEL

__all__ = [
    "GRPC_INFER_PATH",
    "drive_h2load",
    "grpc_body",
    "grpc_request",
    "main",
    "ours_counts",
    "rest_body",
    "triton_counts",
]

TRITONS = ("pytriton", "tritonserver")
# The gRPC call's HTTP/2 path (h2load posts the framed request there).
GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
CLIENTS = (16, 1)


# --- the requests -----------------------------------------------------------------------------
def rest_body(png: bytes) -> tuple[bytes, dict[str, str]]:
    """The protocol's REST request with Triton's binary extension, and its headers."""
    blob = struct.pack("<I", len(png)) + png
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def grpc_request(png: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(struct.pack("<I", len(png)) + png)
    return request


def grpc_body(png: bytes) -> bytes:
    """The gRPC call's HTTP/2 body: an uncompressed frame around the serialized request."""
    message = grpc_request(png).SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


# --- the load clients -------------------------------------------------------------------------
_H2LOAD_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def drive_h2load(url: str, body: bytes, clients: int, seconds: float) -> Load:
    """gRPC calls with h2load: ``clients`` HTTP/2 connections, one call in flight on each,
    for ``seconds``; latencies from its per-request log."""
    with tempfile.TemporaryDirectory() as folder:
        data, log = Path(folder) / "body.bin", Path(folder) / "requests.tsv"
        data.write_bytes(body)
        out = subprocess.run(
            ["h2load", "-t1", f"-c{clients}", "-m1", f"-D{max(1, round(seconds))}",
             "-d", str(data), "-H", "content-type: application/grpc",
             "-H", "te: trailers", f"--log-file={log}", url],
            capture_output=True, text=True, check=True, timeout=seconds + 120,
        ).stdout  # fmt: skip
        elapsed_us = sorted(
            int(fields[2])
            for line in log.read_text().splitlines()
            if len(fields := line.split("\t")) >= 3 and fields[1] == "200"
        )
    counts = _H2LOAD_REQUESTS.search(out)
    finished = re.search(r"finished in ([\d.]+)(m?s)", out)
    if counts is None or finished is None:
        raise RuntimeError(f"h2load printed no summary:\n{out}")
    succeeded, failed, errored, timeout = (int(counts.group(i)) for i in (4, 5, 6, 7))
    duration = float(finished.group(1)) / (1e3 if finished.group(2) == "ms" else 1.0)

    def pct(q: float) -> float:
        return elapsed_us[min(len(elapsed_us) - 1, int(q * len(elapsed_us)))] / 1e3

    return Load(
        concurrency=clients,
        seconds=round(duration, 2),
        requests=succeeded,
        errors=failed + errored + timeout,
        rps=succeeded / duration,
        p50_ms=pct(0.5) if elapsed_us else float("nan"),
        p95_ms=pct(0.95) if elapsed_us else float("nan"),
        p99_ms=pct(0.99) if elapsed_us else float("nan"),
        client="h2load -t1",
    )


# --- the servers and their counters --------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One server and protocol: how to load it and how it counts what it answered."""

    server: str  # "ours", "triton pytriton", "triton tritonserver"
    protocol: str  # "/classify", "OIP REST", "OIP gRPC"
    drive: Callable[[int, float], Load]
    counted: Callable[[], Counts]


# What a server counted so far: answered, failed, and cancelled by the client (Triton counts the
# calls h2load still has in flight when it stops as failures with reason CANCELED).
Counts = tuple[float, float, float]


def ours_counts(url: str, endpoint: str) -> Callable[[], Counts]:
    def counted() -> Counts:
        ok = failed = 0.0
        for key, value in scrape(url).items():
            if key.startswith("vit_requests_total{") and f'endpoint="{endpoint}"' in key:
                if 'status="200"' in key:
                    ok += value
                else:
                    failed += value
        return ok, failed, 0.0

    return counted


def triton_counts(metrics_port: int) -> Callable[[], Counts]:
    def counted() -> Counts:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        series = parse_exposition(text)

        def total(name: str, cancelled: bool = False) -> float:
            return sum(
                v
                for k, v in series.items()
                if k.startswith(name + "{")
                and MODEL_NAME in k
                and ('reason="CANCELED"' in k) == cancelled
            )

        failure = "nv_inference_request_failure"
        return (
            total("nv_inference_request_success"),
            total(failure),
            total(failure, cancelled=True),
        )

    return counted


def targets(ours: Server, tritons: dict[str, Server], png: bytes) -> list[Target]:
    rest, headers = rest_body(png)
    frame = grpc_body(png)
    form, form_type = multipart({"attention": "none"}, [("image", "digit.png", png)])
    infer = f"/v2/models/{MODEL_NAME}/infer"
    octet = "application/octet-stream"

    def wrk(url: str, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> Any:
        return lambda clients, seconds: drive_wrk(url, body, ctype, clients, seconds, 1, extra)

    def h2(port: int) -> Any:
        url = f"http://127.0.0.1:{port}{GRPC_INFER_PATH}"
        return lambda clients, seconds: drive_h2load(url, frame, clients, seconds)

    found = [
        Target("ours", "/classify", wrk(f"{ours.url}/classify", form, form_type),
               ours_counts(ours.url, "classify")),
        Target("ours", "OIP REST", wrk(f"{ours.url}{infer}", rest, octet, headers),
               ours_counts(ours.url, "oip_infer")),
        Target("ours", "OIP gRPC", h2(ours.grpc_port), ours_counts(ours.url, "oip_grpc_infer")),
    ]  # fmt: skip
    for how, server in tritons.items():
        counted = triton_counts(server.metrics_port)
        found += [
            Target(f"triton {how}", "OIP REST", wrk(f"{server.url}{infer}", rest, octet, headers),
                   counted),
            Target(f"triton {how}", "OIP gRPC", h2(server.grpc_port), counted),
        ]  # fmt: skip
    return found


def same_answers(ours: Server, tritons: dict[str, Server], png: bytes) -> dict[str, Any]:
    """The request once to every server over gRPC: the same top class, and how close."""
    answers = {}
    for name, server in {"ours": ours, **tritons}.items():
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
            tensor = triton_grpc.InferInput("image", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[png]], dtype=np.object_))
            answers[name] = client.infer(MODEL_NAME, [tensor]).as_numpy("probabilities")[0]
    top = {name: int(np.argmax(probs)) for name, probs in answers.items()}
    diff = {name: float(np.abs(probs - answers["ours"]).max()) for name, probs in answers.items()}
    return {"top1": top, "max_abs_diff_vs_ours": diff, "same_top1": len(set(top.values())) == 1}


# --- the run --------------------------------------------------------------------------------------
@contextlib.contextmanager
def servers(work: Path, cores: int) -> Iterator[tuple[Server, dict[str, Server]]]:
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(
            serve(
                {"VIT_MODEL": DEFAULT_MODEL, "VIT_ACCESS_LOG": "false"}, work, ready_timeout_s=300
            )
        )
        tritons = {
            how: stack.enter_context(
                serve_triton(work, how=how, model=DEFAULT_MODEL, instances=cores)
            )
            for how in TRITONS
        }
        yield ours, tritons


def run(rounds: int, seconds: float, work: Path) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    png = digit(0, 64, False)
    loads: list[dict[str, Any]] = []
    with servers(work, cores) as (ours, tritons):
        answers = same_answers(ours, tritons, png)
        print(json.dumps({"answers": answers}), flush=True)
        plan = targets(ours, tritons, png)
        for target in plan:  # warm every path
            target.drive(2, 2)
        for round_ in range(1, rounds + 1):
            for clients in CLIENTS:
                for target in plan:
                    before = target.counted()
                    load = target.drive(clients, seconds)
                    time.sleep(0.5)  # the calls in flight when the client stopped
                    after = target.counted()
                    answered, failed, cancelled = (
                        a - b for a, b in zip(after, before, strict=True)
                    )
                    # the calls in flight when the client stopped: answered, or cancelled
                    late = answered + cancelled - load.requests
                    checked = failed == 0 and answered >= load.requests and late <= clients
                    entry = {"round": round_, "server": target.server,
                             "protocol": target.protocol, **asdict(load),
                             "server_answered": answered, "server_failed": failed,
                             "server_cancelled": cancelled, "counts_check": checked}  # fmt: skip
                    loads.append(entry)
                    print(json.dumps(entry), flush=True)
    return {"machine": machine(), "cores": cores, "rounds": rounds, "seconds": seconds,
            "upload": "64x64 PNG digit", "answers": answers, "loads": loads,
            "table": table(loads), "targets": check_targets(table(loads))}  # fmt: skip


def table(loads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (server, protocol, clients): the medians over the rounds, and every error."""
    keys = sorted({(e["server"], e["protocol"], e["concurrency"]) for e in loads},
                  key=lambda k: (k[1], -k[2], k[0]))  # fmt: skip
    rows = []
    for server, protocol, clients in keys:
        key = (server, protocol, clients)
        mine = [e for e in loads if (e["server"], e["protocol"], e["concurrency"]) == key]
        rows.append({
            "protocol": protocol, "clients": clients, "server": server,
            "rps": statistics.median(e["rps"] for e in mine),
            "p50_ms": statistics.median(e["p50_ms"] for e in mine),
            "p99_ms": statistics.median(e["p99_ms"] for e in mine),
            "errors": sum(e["errors"] for e in mine),
            "counts_check": all(e["counts_check"] for e in mine),
            "rounds": [round(e["rps"], 1) for e in mine],
        })  # fmt: skip
    return rows


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets: ours >= Triton's best at 16 clients on both protocols with no
    errors, ours' 1-client p50 <= Triton's best, OIP REST within 10 % of /classify."""

    def row(server: str, protocol: str, clients: int) -> dict[str, Any]:
        key = (server, protocol, clients)
        return next(r for r in rows if (r["server"], r["protocol"], r["clients"]) == key)

    def tritons(protocol: str, clients: int) -> list[dict[str, Any]]:
        return [r for r in rows if r["server"].startswith("triton")
                and (r["protocol"], r["clients"]) == (protocol, clients)]  # fmt: skip

    result: dict[str, Any] = {}
    for protocol in ("OIP REST", "OIP gRPC"):
        theirs16 = max(tritons(protocol, 16), key=lambda r: r["rps"])
        theirs1 = min(tritons(protocol, 1), key=lambda r: r["p50_ms"])
        mine16, mine1 = row("ours", protocol, 16), row("ours", protocol, 1)
        result[protocol] = {
            "triton_best_16": theirs16["server"], "rps_ratio_16": mine16["rps"] / theirs16["rps"],
            "triton_best_1": theirs1["server"], "p50_ratio_1": mine1["p50_ms"] / theirs1["p50_ms"],
            "ours_errors": mine16["errors"] + mine1["errors"],
            "met": mine16["rps"] >= theirs16["rps"] and mine1["p50_ms"] <= theirs1["p50_ms"]
            and mine16["errors"] == mine1["errors"] == 0,
        }  # fmt: skip
    classify16, rest16 = row("ours", "/classify", 16), row("ours", "OIP REST", 16)
    result["OIP REST / classify"] = {
        "rps_ratio_16": rest16["rps"] / classify16["rps"],
        "p50_ratio_1": row("ours", "OIP REST", 1)["p50_ms"] / row("ours", "/classify", 1)["p50_ms"],
        "met": rest16["rps"] >= 0.9 * classify16["rps"],
    }
    return result


def report(result: dict[str, Any]) -> str:
    rows = [{**r, "rps": round(r["rps"], 1), "p50_ms": round(r["p50_ms"], 2),
             "p99_ms": round(r["p99_ms"], 2)} for r in result["table"]]  # fmt: skip
    lines = [
        f"# Ours beside Triton on the Open Inference Protocol ({result['machine']['date']})",
        "",
        f"{result['machine']['cpu']}, {result['cores']} cores; {result['rounds']} rounds of "
        f"{result['seconds']:g} s per load, medians; one 64x64 PNG per request. HTTP: wrk; "
        "gRPC: h2load. counts_check: the server's own counters agree and show no failure.",
        "",
        markdown(
            rows,
            [
                "protocol",
                "clients",
                "server",
                "rps",
                "p50_ms",
                "p99_ms",
                "errors",
                "counts_check",
                "rounds",
            ],
        ),
        "Answers: " + json.dumps(result["answers"]),
        "",
        "Targets: " + json.dumps(result["targets"], indent=1),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per load")
    args = parser.parse_args(argv)
    for tool in ("wrk", "h2load"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: `make system` installs it")
    work = RESULTS / "work"
    work.mkdir(parents=True, exist_ok=True)
    result = run(args.rounds, args.seconds, work)
    write("bench-oip", result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
