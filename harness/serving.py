"""Run a real ``bentoml serve`` of the service, or the hand-written peer, on a loopback port; build
the Bento as the image does."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

__all__ = [
    "Server",
    "build_bento",
    "free_port",
    "free_ports",
    "parse_exposition",
    "pinned",
    "scrape",
    "serve",
    "serve_model",
    "serve_peer",
    "serve_triton",
    "server_cpu",
    "wait_ready",
]

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range.

    Never one the kernel hands out as a source port: a client that reconnects to a port in that
    range while nothing listens there (a model server restarting, a replica being replaced) can
    be given that very port as its own source and connect to itself (TCP self-connect), and the
    server then cannot bind it ("Address already in use"; seen in CI). Real deployments listen
    outside the range too (3000, 5555).
    """
    low = _ephemeral_low()
    for _ in range(1000):
        port = _RANDOM.randrange(max(1024, low - 20_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} after 1000 tries")


def free_ports(count: int) -> list[int]:
    """``count`` different free ports (none bound yet, so ask until they differ)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


_RANDOM = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def parse_exposition(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            series[key] = float(value)
    return series


def scrape(url: str) -> dict[str, float]:
    """The service's /metrics, parsed."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    response.raise_for_status()
    return parse_exposition(response.text)


# Fresh connections that must find a server ready, in a row: with two workers, the chance that
# all of them land on one is 2**-15.
READY_PROBES = 16


def wait_ready(
    process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float, what: str
) -> None:
    """Poll ``url`` until it answers 200 on ``READY_PROBES`` fresh connections in a row (the
    kernel spreads new connections over the workers: all of them are ready, not only the
    first); fail early if ``process`` exits, or once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    in_a_row = 0
    while in_a_row < READY_PROBES:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            ready = httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        in_a_row = in_a_row + 1 if ready else 0
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} not ready in {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}"
            )
        if not ready:
            time.sleep(0.2)


@dataclass(frozen=True)
class Server:
    """A running service: its base URL and its log file."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]
    grpc_port: int = 0  # its Open Inference Protocol over gRPC (0: none)
    metrics_port: int = 0  # Triton's metrics (0: /metrics on the HTTP port, or none)

    @property
    def port(self) -> int:
        """The loopback port it listens on."""
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve(
    env: dict[str, str],
    log_dir: Path,
    *,
    ready_timeout_s: float = 180.0,
    port: int | None = None,
    ready_path: str = "/readyz",
) -> Iterator[Server]:
    """Start ``bentoml serve service.service:VitClassifier``; yield once ``ready_path`` (by
    default /readyz) answers 200. Its gRPC port is a free one of its own (``Server.grpc_port``)
    unless ``env`` sets ``VIT_GRPC_PORT``: servers on one host must not share the default's
    (its workers share it with ``SO_REUSEPORT``, and so would two servers)."""
    port = port or free_port()
    grpc_port = int(env.get("VIT_GRPC_PORT", 0)) if "VIT_GRPC_PORT" in env else free_port()
    full_env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        # Each server gets its own BentoML home: `bentoml serve` empties
        # $BENTOML_HOME/prometheus_multiproc_dir at start, wiping any other server's metrics.
        # Pass BENTOML_HOME in env to serve a 'bento:' model from the real store.
        "BENTOML_HOME": str(log_dir / f"bentoml-home-{port}"),
        "VIT_GRPC_PORT": str(grpc_port),
        # A server started here is measured or counted: a repeated upload must reach the
        # model, so the response cache is off unless ``env`` turns it on.
        "VIT_CACHE_BYTES": "0",
        **env,
    }
    command = [sys.executable, "-m", "bentoml", "serve", "service.service:VitClassifier",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with _run(command, full_env, log_dir / f"serve-{port}.log", port, ready_path,
              ready_timeout_s, "bentoml serve") as server:  # fmt: skip
        yield dataclasses.replace(server, grpc_port=grpc_port)


@contextlib.contextmanager
def serve_model(
    env: dict[str, str],
    log_dir: Path,
    *,
    bind: str,
    ready_timeout_s: float = 180.0,
    port: int | None = None,
) -> Iterator[Server]:
    """Start a model process on its own (``bentoml serve service.service:VitModel`` listening
    on ``bind``, e.g. ``tcp://127.0.0.1:5555``); yield once its /readyz answers 200. The
    ``Server``'s URL is its BentoML HTTP port (probes, /metrics, POST /status)."""
    port = port or free_port()
    full_env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        "BENTOML_HOME": str(log_dir / f"bentoml-home-{port}"),
        "VIT_MODEL_BIND": bind,
        **env,
    }
    command = [sys.executable, "-m", "bentoml", "serve", "service.service:VitModel",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with _run(command, full_env, log_dir / f"model-{port}.log", port, "/readyz",
              ready_timeout_s, "bentoml serve (model)") as server:  # fmt: skip
        yield server


@contextlib.contextmanager
def serve_peer(
    log_dir: Path,
    *,
    model: str,
    workers: int = 1,
    threads: int = 0,
    ready_timeout_s: float = 180.0,
    port: int | None = None,
) -> Iterator[Server]:
    """Start the hand-written peer (``loadtests.peer``); yield once all its workers are ready."""
    port = port or free_port()
    command = [sys.executable, "-m", "loadtests.peer", "--model", model, "--port", str(port),
               "--workers", str(workers), "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with _run(command, env, log_dir / f"peer-{port}.log", port, "/healthz",
              ready_timeout_s, "loadtests.peer") as server:  # fmt: skip
        yield server


TRITON_PYTHON = REPO / ".venv" / "triton" / "bin" / "python"


@contextlib.contextmanager
def serve_triton(
    log_dir: Path,
    *,
    how: str,
    model: str,
    instances: int,
    ready_timeout_s: float = 180.0,
) -> Iterator[Server]:
    """Start Triton serving ``model`` (``loadtests.triton_peer``: ``how`` is ``pytriton`` or
    ``tritonserver``) in ``.venv/triton`` (``make triton-env``); yield once the model is ready."""
    if not TRITON_PYTHON.is_file():
        raise RuntimeError(f"{TRITON_PYTHON} is missing: run `make triton-env` first")
    port, grpc_port, metrics_port = free_ports(3)
    command = [str(TRITON_PYTHON), "-m", "loadtests.triton_peer", how, "--model", model,
               "--http-port", str(port), "--grpc-port", str(grpc_port),
               "--metrics-port", str(metrics_port), "--instances", str(instances)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    log = log_dir / f"triton-{how}-{port}.log"
    ready = "/v2/models/vit-digits/ready"
    with _run(command, env, log, port, ready, ready_timeout_s, f"triton ({how})") as server:
        yield dataclasses.replace(server, grpc_port=grpc_port, metrics_port=metrics_port)


@contextlib.contextmanager
def _run(
    command: list[str],
    env: dict[str, str],
    log: Path,
    port: int,
    ready_path: str,
    ready_timeout_s: float,
    what: str,
) -> Iterator[Server]:
    """Run ``command`` in its own process group until the block ends; SIGTERM, then SIGKILL."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", log, process)
    try:
        wait_ready(process, f"{server.url}{ready_path}", log, ready_timeout_s, what)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def build_bento(
    home: Path, bentofile: Path | None = None, env: dict[str, str] | None = None
) -> tuple[str, Path]:
    """``bentoml build`` (of ``bentofile``, else the top-level one) into its own BentoML home,
    with ``env`` (e.g. ``VIT_TOPOLOGY``) added to the environment the service is imported in.

    Returns:
        The Bento's tag and its folder.
    """
    env = {**os.environ, **(env or {}), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "bentoml", "build", "--output", "tag"]
    if bentofile is not None:
        command += ["-f", str(bentofile), "."]
    build = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        raise RuntimeError(f"bentoml build failed:\n{build.stderr[-4000:]}")
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return tag, home / "bentos" / "vit-classifier" / tag.split(":", 1)[1]


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run this process on ``cpus`` for the block, if given: processes it starts meanwhile (a
    server, wrk) inherit the affinity and keep it."""
    mine = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


@contextlib.contextmanager
def server_cpu(running: Server) -> Iterator[dict[str, float]]:
    """CPU seconds (user + system) the server's processes spent in the block: ``["seconds"]``
    once it ends. Of the processes alive at its end (one that died during it is not counted)."""
    spent: dict[str, float] = {}

    def times() -> dict[int, float]:
        try:
            root = psutil.Process(running.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        out = {}
        for process in tree:
            with contextlib.suppress(psutil.Error):
                used = process.cpu_times()
                out[process.pid] = used.user + used.system
        return out

    before = times()
    yield spent
    after = times()
    spent["seconds"] = sum(t - before.get(pid, 0.0) for pid, t in after.items())
