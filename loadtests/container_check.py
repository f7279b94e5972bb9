"""Build the service image with podman and prove it works: ``make container-test``.

    python -m loadtests.container_check                 # --cpus 1, 100 held-out digits
    python -m loadtests.container_check --cpus 2 --images 200

Without an image registry: the base images come from Debian packages
(``deploy/container/base-images.sh``: mmdebstrap + ``podman import``, then uv, and Debian's
prometheus), the Bento from ``deploy/container/bentofile.yaml`` (the top-level bentofile with
``docker.base_image`` pointing at that base), the image from ``bentoml containerize --backend
podman``. Podman runs with ``deploy/container/containers.conf`` (runc, host network, ulimits the
sandbox allows).

Then, against the image:

- it holds the default model and ``service/web/ui/`` (listed inside the image);
- with no network at all (``--network none``) it loads the model and turns ready;
- run with ``--cpus N``: ``/readyz`` turns 200, ``GET /model`` reports thread pools sized to
  the quota, the process runs as a non-root user, held-out digits sent through it are
  classified at >= 95 % top-1, bad uploads get their 4xx, ``/ui/`` serves the packaged page and
  ``/metrics`` counts every image;
- the image exposes 3000 and 3001, and the Open Inference Protocol answers over gRPC
  (``tritonclient.grpc``: live, the model ready, digits inferred as ``/classify`` classifies
  them);
- a Prometheus container (Debian's package) with ``deploy/prometheus/`` config and rules scrapes
  it and reports ``vit_images_total`` equal to the images sent;
- ``podman stop`` (SIGTERM) stops it within the grace period, exit code 0, shutdown hook run.

Images are kept (a second run reuses every layer but the code's); containers are removed.
Prints a summary and writes ``results/container-test.json``; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as triton
import yaml

from harness.prometheus import JOB, Prometheus
from harness.samples import digit
from harness.serving import REPO, build_bento, free_port, parse_exposition, wait_ready
from models.digits import load_split

__all__ = ["main", "run"]

CONTAINER_DIR = REPO / "deploy" / "container"
CONTAINERS_CONF = CONTAINER_DIR / "containers.conf"
BENTOFILE = CONTAINER_DIR / "bentofile.yaml"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RESULTS = REPO / "results"
IMAGE = "localhost/vit-classifier:container-test"
BASE_IMAGE = "localhost/vit-serve-base:bookworm"
PROMETHEUS_IMAGE = "localhost/vit-serve-prometheus:bookworm"
CA_MOUNT = "/etc/ssl/certs:/etc/ssl/certs:ro"
# Where BentoML's generated Dockerfile puts the Bento inside the image.
BENTO_PATH = "/home/bentoml/bento"
MIN_ACCURACY = 0.95
BAD_UPLOADS = 4  # junk bodies: each must come back 415 and count as a client error
GRPC_IMAGES = 4  # digits sent in one gRPC request (and again one by one to /classify)


@dataclass
class Report:
    """What was measured and which checks passed; written as JSON at the end."""

    facts: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record one check; a failed one keeps its detail for the summary."""
        self.checks[name] = bool(ok)
        if not ok:
            self.problems.append(f"{name}: {detail}" if detail else name)
        return ok


def _podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def _podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    """Run ``podman ARGS`` with the project's engine settings; its stdout."""
    result = subprocess.run(
        ["podman", *args], env=_podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip()


def _timed(command: list[str], log: Path, env: dict[str, str], timeout: float) -> float:
    """Run ``command`` with its output in ``log``; seconds taken, or raise with the log's tail."""
    started = time.monotonic()
    with log.open("w") as sink:
        result = subprocess.run(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(command[:3])} failed (exit {result.returncode}):\n{tail}")
    return round(time.monotonic() - started, 1)


# --- build ------------------------------------------------------------------------------------


def build_image(report: Report, work: Path, logs: Path) -> Path:
    """Base images (if missing), the Bento, the image; the Bento's folder."""
    env = _podman_env()
    cached = all(
        subprocess.run(["podman", "image", "exists", image], env=env).returncode == 0
        for image in (BASE_IMAGE, PROMETHEUS_IMAGE)
    )
    report.facts["base_images_cached"] = cached
    report.facts["base_images_s"] = _timed(
        [str(CONTAINER_DIR / "base-images.sh")], logs / "base-images.log", env, timeout=1200
    )

    home = work / "bentoml-home"
    started = time.monotonic()
    tag, bento = build_bento(home, BENTOFILE)
    report.facts["bento_build_s"] = round(time.monotonic() - started, 1)
    report.facts["bento"] = tag
    bento_env = {**env, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}

    previous = _podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False)
    report.facts["image_build_s"] = _timed(
        [sys.executable, "-m", "bentoml", "containerize", tag, "--backend", "podman",
         "--image-tag", IMAGE, "--opt", "network=host", "--opt", f"volume={CA_MOUNT}"],
        logs / "containerize.log", bento_env, timeout=1800,
    )  # fmt: skip
    current = _podman("image", "inspect", "--format", "{{.Id}}", IMAGE)
    if previous and previous != current:
        # The last run's image, now untagged: drop it (its shared layers stay cached).
        _podman("rmi", previous, check=False)
    size = int(_podman("image", "inspect", "--format", "{{.Size}}", IMAGE))
    report.facts["image"] = IMAGE
    report.facts["image_size_bytes"] = size
    report.facts["image_size_gb"] = round(size / 1e9, 2)
    return bento


def check_contents(report: Report, bento: Path) -> None:
    """The image holds what the Bento packed: the default model and the page."""
    wanted = sorted(
        str(path.relative_to(bento / "src"))
        for folder in ("models/vit-digits", "service/web/ui")
        for path in (bento / "src" / folder).rglob("*")
        if path.is_file()
    )
    listed = _podman(
        "run", "--rm", "--network", "none", "--entrypoint", "find", IMAGE,
        f"{BENTO_PATH}/src/models/vit-digits", f"{BENTO_PATH}/src/service/web/ui", "-type", "f",
        check=False,
    ).splitlines()  # fmt: skip
    found = sorted(line.removeprefix(f"{BENTO_PATH}/src/") for line in listed)
    report.facts["image_files"] = found
    missing = sorted(
        ({"models/vit-digits/model.safetensors", "service/web/ui/index.html"} | set(wanted))
        - set(found)
    )
    report.check("image holds the model and the page", not missing, f"missing {missing}")


# --- run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def container(name: str, args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``podman run --name NAME ARGS`` attached (its output in ``log``); removed at the end."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["podman", "run", "--name", name, *args],
            env=_podman_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        _podman("rm", "--force", "--time", "0", name, check=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)


def check_offline_start(report: Report, logs: Path, timeout_s: float) -> None:
    """The image turns ready with no network at all: nothing is downloaded at run time."""
    name = f"vit-ct-offline-{os.getpid()}"
    probe = (
        "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2)"
    )
    started = time.monotonic()
    with container(name, ["--network", "none", IMAGE, "serve"], logs / "offline.log") as process:
        ready = False
        while not ready and process.poll() is None and time.monotonic() - started < timeout_s:
            time.sleep(1)
            ready = (
                subprocess.run(
                    ["podman", "exec", name, "python", "-c", probe],
                    env=_podman_env(), capture_output=True, timeout=30,
                ).returncode
                == 0
            )  # fmt: skip
    report.facts["offline_ready_s"] = round(time.monotonic() - started, 1) if ready else None
    report.check(
        "ready with --network none",
        ready,
        (logs / "offline.log").read_text(errors="replace")[-2000:],
    )


async def _post_all(url: str, uploads: list[bytes]) -> list[httpx.Response]:
    """POST each upload to /classify (top_k=1), 8 at a time."""
    semaphore = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(data: bytes) -> httpx.Response:
            async with semaphore:
                return await client.post(
                    "/classify", files={"image": ("digit.png", data)}, data={"top_k": "1"}
                )

        return list(await asyncio.gather(*(one(data) for data in uploads)))


def send_digits(report: Report, url: str, count: int) -> dict[str, int]:
    """``count`` held-out digits and a few junk uploads through the container; what was sent."""
    labels = [str(label) for label in load_split().y_test[:count]]
    uploads = [digit(index, 64, False) for index in range(count)]
    junk = [b"this is not an image"] * BAD_UPLOADS
    started = time.monotonic()
    responses = asyncio.run(_post_all(url, uploads + junk))
    report.facts["classify_s"] = round(time.monotonic() - started, 2)
    answers = responses[:count]
    statuses = [r.status_code for r in answers]
    report.check("every digit answered 200", statuses == [200] * count, f"statuses {statuses}")
    correct = sum(
        r.status_code == 200 and r.json()["predictions"][0]["label"] == label
        for r, label in zip(answers, labels, strict=True)
    )
    accuracy = correct / count
    report.facts["digits_sent"] = count
    report.facts["digits_correct"] = correct
    report.facts["accuracy"] = round(accuracy, 4)
    report.check(f"top-1 accuracy >= {MIN_ACCURACY:.0%}", accuracy >= MIN_ACCURACY, f"{accuracy}")
    junk_codes = [(r.status_code, r.json().get("error", {}).get("code")) for r in responses[count:]]
    report.check(
        "junk uploads get 415 unsupported_media_type",
        junk_codes == [(415, "unsupported_media_type")] * BAD_UPLOADS,
        f"{junk_codes}",
    )
    return {"ok": count, "client_error": BAD_UPLOADS}


def check_grpc(report: Report, url: str, grpc_port: int, count: int) -> int:
    """The image exposes both ports (3001 from the offline base); ``tritonclient.grpc`` gets the
    same top-1 as ``/classify`` for ``count`` digits sent in one request. Returns the images it
    sent."""
    exposed = _podman("image", "inspect", "--format", "{{json .Config.ExposedPorts}}", IMAGE)
    report.facts["exposed_ports"] = sorted(json.loads(exposed) or {})
    report.check(
        "the image exposes 3000 (HTTP) and 3001 (gRPC)",
        {"3000/tcp", "3001/tcp"} <= set(report.facts["exposed_ports"]),
        exposed,
    )
    model = httpx.get(f"{url}/model", timeout=30).json()["model"]["name"]
    uploads = [digit(index, 64, False) for index in range(count)]
    with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        ready = client.is_server_live() and client.is_model_ready(model)
        tensor = triton.InferInput("image", [count], "BYTES")
        tensor.set_data_from_numpy(np.array(uploads, dtype=np.object_))
        answer = client.infer(model, [tensor], client_timeout=60)
    over_grpc = answer.as_numpy("probabilities").argmax(axis=1).tolist()
    over_http = [
        httpx.post(f"{url}/classify", files={"image": ("d.png", data)}, timeout=60).json()[
            "predictions"
        ][0]["index"]
        for data in uploads
    ]
    report.facts["grpc_top1"] = over_grpc
    report.check(
        f"gRPC live, {model} ready, {count} digits classified as /classify does",
        ready and over_grpc == over_http,
        f"ready {ready}, gRPC {over_grpc}, HTTP {over_http}",
    )
    return 2 * count


def check_service(report: Report, url: str, name: str, bento: Path, cpus: float) -> None:
    """/model's thread pools, the user, /ui/ against the packaged files, /metrics."""
    body = httpx.get(f"{url}/model", timeout=30).json()
    runtime = body.get("runtime", {})
    expected = max(1, min(len(os.sched_getaffinity(0)), math.floor(cpus)))
    report.facts["host_cpus"] = len(os.sched_getaffinity(0))
    report.facts["runtime"] = runtime
    report.check(
        f"processes and thread pools sized to --cpus {cpus:g}",
        runtime.get("cpus") == expected
        # the default model on CPU: one single-threaded replica per CPU of the quota
        and runtime.get("topology") == "replicas"
        and runtime.get("http_workers") == expected
        and runtime.get("torch_threads") == 1
        and runtime.get("decode_threads") == 1,
        f"expected {expected} CPUs, /model says {runtime}",
    )
    report.facts["model_source"] = body.get("model", {}).get("source")

    uid = _podman("exec", name, "id", "-u")
    status = _podman("exec", name, "cat", "/proc/1/status")
    pid1_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    report.facts["uid"] = int(uid)
    report.facts["user"] = _podman("exec", name, "id", "-un")
    report.facts["pid1_uid"] = int(pid1_uid)
    report.check("runs as a non-root user", uid != "0" and pid1_uid != "0", f"uid {uid}/{pid1_uid}")

    ui = bento / "src" / "service" / "web" / "ui"
    served = {}
    for path in sorted(p for p in ui.rglob("*") if p.is_file()):
        relative = path.relative_to(ui).as_posix()
        response = httpx.get(f"{url}/ui/{'' if relative == 'index.html' else relative}", timeout=30)
        served[relative] = response.status_code == 200 and response.content == path.read_bytes()
    report.facts["ui_files_served"] = served
    report.check(
        "/ui/ serves the packaged page", bool(served) and all(served.values()), f"{served}"
    )

    metrics = httpx.get(f"{url}/metrics", timeout=30)
    report.check("/metrics answers", metrics.status_code == 200, f"status {metrics.status_code}")


def _prometheus_config(folder: Path, service_port: int, prom_port: int) -> Path:
    """deploy/prometheus/ with its targets pointed at the host network's ports."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    ports = {JOB: service_port, "prometheus": prom_port}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS_DIR / "rules.yml", folder / "rules.yml")
    return folder


def check_prometheus(report: Report, prom: Prometheus, sent: dict[str, int]) -> None:
    """After a scrape that follows the traffic, Prometheus counts every image sent."""
    report.facts["prometheus_last_scrape_after_s"] = round(
        prom.wait_for_scrape_after(time.time(), timeout_s=60) - time.time(), 1
    )
    total = prom.scalar("sum(vit_images_total)")
    by_outcome = {
        dict(labels)["outcome"]: value
        for labels, value in prom.vector("sum by (outcome) (vit_images_total)").items()
    }
    report.facts["prometheus_images_total"] = total
    report.facts["prometheus_by_outcome"] = by_outcome
    report.facts["images_sent"] = sum(sent.values())
    report.check(
        "Prometheus vit_images_total == images sent",
        total == sum(sent.values()) and by_outcome == sent,
        f"Prometheus {total} {by_outcome}, sent {sent}",
    )
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]
    loaded = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    count = sum(len(group["rules"]) for group in loaded)
    report.facts["prometheus_rules_loaded"] = count
    report.check(
        "Prometheus loaded deploy/prometheus/rules.yml",
        count == sum(len(group["rules"]) for group in rules),
        f"{count} rules loaded",
    )


def stop(
    report: Report, name: str, process: subprocess.Popen[bytes], log: Path, grace: int
) -> None:
    """``podman stop`` (SIGTERM, then SIGKILL after ``grace`` s): how long, and how it ended."""
    started = time.monotonic()
    _podman("stop", "--time", str(grace), name, timeout=grace + 60)
    stop_s = round(time.monotonic() - started, 2)
    code = int(_podman("inspect", "--format", "{{.State.ExitCode}}", name))
    process.wait(timeout=30)
    text = log.read_text(errors="replace")
    report.facts["stop_s"] = stop_s
    report.facts["stop_grace_s"] = grace
    report.facts["exit_code"] = code
    # 0: BentoML's arbiter caught SIGTERM and shut down; 137 would be the SIGKILL after the grace
    # period, 143 a process killed by SIGTERM without running its shutdown.
    report.check(
        f"stops on SIGTERM within {grace} s, exit 0",
        stop_s < grace and code == 0,
        f"{stop_s} s, exit {code}",
    )
    report.check(
        "shutdown hook ran",
        "Completed async cleanup hook: _shutdown" in text and "Traceback" not in text,
        text[-2000:],
    )


def run(report: Report, cpus: float, images: int, grace: int, ready_timeout_s: float) -> None:
    """The whole check; every finding goes into ``report``."""
    report.facts["cpus_limit"] = cpus
    report.facts["podman"] = _podman("--version")
    logs = RESULTS / "container-test"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vit-container-") as tmp:
        work = Path(tmp)
        bento = build_image(report, work, logs)
        check_contents(report, bento)
        check_offline_start(report, logs, ready_timeout_s)

        port, prom_port, grpc_port = free_port(), free_port(), free_port()
        name, prom_name = f"vit-ct-{os.getpid()}", f"vit-ct-prometheus-{os.getpid()}"
        url = f"http://127.0.0.1:{port}"
        log = logs / "service.log"
        run_args = ["--cpus", f"{cpus:g}", "--stop-timeout", str(grace),
                    "--env", f"VIT_GRPC_PORT={grpc_port}", IMAGE,
                    "serve", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        run_started = time.monotonic()
        with container(name, run_args, log) as process:
            wait_ready(process, f"{url}/readyz", log, ready_timeout_s, "the service container")
            report.facts["ready_s"] = round(time.monotonic() - run_started, 1)
            config = _prometheus_config(work / "prometheus", port, prom_port)
            prom_log = logs / "prometheus.log"
            prom_args = ["--volume", f"{config}:/etc/prometheus:ro", PROMETHEUS_IMAGE,
                         "--config.file=/etc/prometheus/prometheus.yml",
                         f"--web.listen-address=127.0.0.1:{prom_port}"]  # fmt: skip
            with container(prom_name, prom_args, prom_log) as prom_process:
                prom = Prometheus(f"http://127.0.0.1:{prom_port}", prom_process, prom_log)
                wait_ready(prom_process, f"{prom.url}/-/ready", prom_log, 60, "prometheus")
                prom.wait_for_scrape_after(time.time(), timeout_s=60)
                check_service(report, url, name, bento, cpus)
                sent = send_digits(report, url, images)
                sent["ok"] += check_grpc(report, url, grpc_port, GRPC_IMAGES)
                series = parse_exposition(httpx.get(f"{url}/metrics", timeout=30).text)
                counted = sum(v for k, v in series.items() if k.startswith("vit_images_total{"))
                report.check(
                    "/metrics counts every image", counted == sum(sent.values()), f"{counted}"
                )
                check_prometheus(report, prom, sent)
            stop(report, name, process, log, grace)
    report.facts["total_s"] = round(time.monotonic() - started, 1)


def _summary(report: Report) -> str:
    f = report.facts
    runtime = f.get("runtime", {})
    lines = [
        f"base images        {f.get('base_images_s')} s "
        f"({'cached' if f.get('base_images_cached') else 'built'})",
        f"bento build        {f.get('bento_build_s')} s",
        f"image build        {f.get('image_build_s')} s  ({f.get('image')})",
        f"image size         {f.get('image_size_gb')} GB",
        f"offline start      ready in {f.get('offline_ready_s')} s with --network none",
        f"ready              {f.get('ready_s')} s after podman run --cpus {f.get('cpus_limit')}",
        f"threads            cpus={runtime.get('cpus')} torch={runtime.get('torch_threads')} "
        f"decode={runtime.get('decode_threads')} (host has {f.get('host_cpus')} CPUs)",
        f"user               {f.get('user')} uid {f.get('uid')} (pid 1 uid {f.get('pid1_uid')})",
        f"accuracy           {f.get('digits_correct')}/{f.get('digits_sent')} held-out digits "
        f"top-1 = {f.get('accuracy')}",
        f"prometheus         vit_images_total = {f.get('prometheus_images_total')} "
        f"{f.get('prometheus_by_outcome')}, sent {f.get('images_sent')}",
        f"stop               {f.get('stop_s')} s (grace {f.get('stop_grace_s')} s), "
        f"exit code {f.get('exit_code')}",
        f"total              {f.get('total_s')} s",
    ]
    for name, ok in report.checks.items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name}")
    lines += [f"  problem: {problem}" for problem in report.problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=float, default=1.0, help="podman run --cpus (default 1)")
    parser.add_argument("--images", type=int, default=100, help="held-out digits to classify")
    parser.add_argument("--grace", type=int, default=30, help="podman stop grace period, s")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to /readyz")
    parser.add_argument("--out", type=Path, default=RESULTS / "container-test.json")
    args = parser.parse_args(argv)
    if shutil.which("podman") is None:
        print("podman not found: apt-get install -y podman runc mmdebstrap", file=sys.stderr)
        return 2
    report = Report()
    try:
        run(report, args.cpus, args.images, args.grace, args.ready_timeout)
    except Exception as exc:  # a step that could not go on: reported like a failed check
        report.check("the run completed", False, f"{type(exc).__name__}: {exc}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"facts": report.facts, "checks": report.checks, "problems": report.problems}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(_summary(report))
    print(f"-> {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0 if report.checks and all(report.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
