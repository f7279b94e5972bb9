"""A rehearsal of what a Kubernetes cluster does with ``deploy/kubernetes``, as processes on
loopback (no cluster runs here).

    python -m loadtests.rehearsal --users 96 --out results/rehearsal.json      # make rehearsal

What stands in for what:

- **pods**: ``bentoml serve`` processes configured with the ``VIT_*`` values of the rendered base
  ConfigMap (``kubectl kustomize deploy/kubernetes/base``), one worker each (this machine has two
  cores for all of them), three replicas plus a fourth port for the rolling update's surge pod
  (``maxSurge: 1``, ``maxUnavailable: 0``);
- **the Service / an ingress**: Debian's HAProxy, balancing requests over the replicas and
  health-checking ``/readyz`` exactly as the rendered readinessProbe does (its period, timeout and
  failure threshold become ``inter``, ``timeout check`` and ``fall``). Like the NGINX ingress
  controller's default (``proxy-next-upstream: error timeout``) it tries a refused connection on
  another replica and never re-sends a request a replica had taken (no ``retry-on
  empty-response``). Each request gets its own connection to a replica
  (``http-server-close``), so the balancer's current sessions on a replica are exactly its
  requests in flight. (With pooled upstream connections, a request sent on a pooled connection
  to a replica that just died is lost too: HAProxy closes the client's connection so that the
  client may retry. Clients should retry on a closed connection; classification is idempotent.)
- **the Prometheus operator**: a real Prometheus scraping every replica, each series labelled
  ``service="vit-serve"`` as the ServiceMonitor's Service would;
- **KEDA**: the rendered ScaledObject's own PromQL, evaluated against that Prometheus, turned
  into the replica count KEDA's HPA would ask for: ``clamp(ceil(value / threshold), min, max)``
  (an ``AverageValue`` target), and ``min`` once the value is at or below ``activationThreshold``;
- **traffic**: locust (``loadtests/rehearsal_users.py``) through the balancer.

During the load: a rolling update (the surge replica starts and turns ready, then one replica gets
SIGTERM and drains), a crash (every process of another replica gets SIGKILL, as the kernel kills
a container), then a burst of more users than the two replicas left can batch (past the
admission limit they are told 503 ``overloaded``, which counts as a refusal, not a failure).

What the crash costs is counted from both sides: the client's failed requests, the balancer's
sessions on the replica (sampled from just before the kill until its processes are gone: a
lower bound of what it held) and its error counters for it. They do not agree: in runs here the
clients lost more requests (e.g. 38) than the balancer counted errors on the replica (25) or
sampled in flight (17). The difference is requests whose client connection HAProxy closed with
no response and no log line; why is not established.

The report counts requests per replica (the balancer's counters and each replica's own
``vit_requests_total``), failed requests at each event, how long the balancer took to route
around the killed replica, and the scaling query under load and at rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from loadtests.prometheus import Prometheus, run_prometheus
from loadtests.serving import REPO, Server, free_port, serve

__all__ = ["Shipped", "rehearse", "shipped"]

KUSTOMIZE = REPO / "deploy" / "kubernetes"
SERVICE_LABEL = "vit-serve"  # the Service name a ServiceMonitor puts in `service`
JOB = "vit-serve-pods"


# --- what deploy/kubernetes ships ---------------------------------------------------------------
@dataclass(frozen=True)
class Shipped:
    """The rendered manifests' values the rehearsal runs with."""

    env: dict[str, str]  # the ConfigMap's VIT_* values
    readiness: dict[str, Any]  # the container's readinessProbe
    grace_s: int  # terminationGracePeriodSeconds
    query: str  # the KEDA trigger's PromQL
    threshold: float
    activation: float
    min_replicas: int
    max_replicas: int

    def replicas_for(self, value: float) -> int:
        """What KEDA's HPA asks for at this query value (AverageValue target)."""
        if value <= self.activation:
            return self.min_replicas
        return max(self.min_replicas, min(self.max_replicas, math.ceil(value / self.threshold)))


def _render(overlay: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not installed (it renders deploy/kubernetes)")
    out = subprocess.run(
        [kubectl, "kustomize", str(overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    if len(found) != 1:
        raise RuntimeError(f"expected one {kind}, rendered {len(found)}")
    return found[0]


def shipped() -> Shipped:
    """Read the values the rehearsal uses from the rendered base and autoscale overlay."""
    base = _render(KUSTOMIZE / "base")
    pod = _one(base, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    scaled = _one(_render(KUSTOMIZE / "overlays" / "autoscale"), "ScaledObject")["spec"]
    trigger = next(t for t in scaled["triggers"] if t["type"] == "prometheus")["metadata"]
    return Shipped(
        env={k: str(v) for k, v in _one(base, "ConfigMap")["data"].items()},
        readiness=container["readinessProbe"],
        grace_s=int(pod["terminationGracePeriodSeconds"]),
        query=trigger["query"],
        threshold=float(trigger["threshold"]),
        activation=float(trigger.get("activationThreshold", 0)),
        min_replicas=int(scaled.get("minReplicaCount", 0)),
        max_replicas=int(scaled.get("maxReplicaCount", 100)),
    )


# --- the balancer --------------------------------------------------------------------------------
@dataclass
class Balancer:
    """A running HAProxy: its URL and runtime socket; ``watch`` records each server's state
    changes (UP/DOWN, with the time) and the latest counters."""

    url: str
    socket_path: Path
    process: subprocess.Popen[bytes]
    log: Path
    changes: list[tuple[float, str, str]] = field(default_factory=list)
    latest: dict[str, dict[str, str]] = field(default_factory=dict)

    def _ask(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def info(self) -> dict[str, str]:
        """``show info``: the process's counters (``DroppedLogs``, ...)."""
        pairs = (line.partition(":") for line in self._ask("show info").splitlines())
        return {key.strip(): value.strip() for key, _, value in pairs if key}

    def stat(self) -> dict[str, dict[str, str]]:
        """``show stat`` for the backend's servers: {server: {field: value}}."""
        lines = self._ask("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def status(self, server: str) -> str:
        return self.stat()[server]["status"].split()[0]

    def watch(self, stop: threading.Event, every_s: float = 0.05) -> None:
        state: dict[str, str] = {}
        while not stop.is_set():
            with contextlib.suppress(OSError):
                rows = self.stat()
                self.latest = rows
                for name, row in rows.items():
                    now = row["status"].split()[0]
                    if state.get(name) != now:
                        state[name] = now
                        self.changes.append((time.time(), name, now))
            time.sleep(every_s)

    def routed(self) -> list[Routed]:
        """Every request the balancer has logged so far."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 7 and parts[0] == _LOG_TAG:
                _, server, status, termination, retries, active_ms, end_ms = parts
                end = int(end_ms) / 1000
                start = end - max(int(active_ms), 0) / 1000
                found.append(Routed(server, int(status), termination, retries, start, end))
        return found

    def went(self, server: str, status: str, after: float) -> float | None:
        """When ``server`` turned ``status`` after ``after`` (Unix seconds), if it did."""
        return next(
            (
                at
                for at, name, now in self.changes
                if name == server and now == status and at > after
            ),
            None,
        )


_LOG_TAG = "vitreq"  # one line per request: server, status, termination state, retries, ms, end


@dataclass(frozen=True)
class Routed:
    """One request as the balancer logged it: the server that answered (or was tried last),
    the status (-1: none), HAProxy's termination state, retries, and start/end (Unix s)."""

    server: str
    status: int
    termination: str
    retries: str
    start: float
    end: float

    @property
    def answered(self) -> bool:
        """A whole 200 reached the client (``-`` first: the stream ended normally)."""
        return self.status == 200 and self.termination.startswith("-")


def _haproxy_config(
    ports: dict[str, int], front: int, sock: Path, readiness: dict[str, Any]
) -> str:
    period = int(readiness.get("periodSeconds", 10))
    timeout = int(readiness.get("timeoutSeconds", 1))
    fall = int(readiness.get("failureThreshold", 3))
    rise = int(readiness.get("successThreshold", 1))
    servers = "\n".join(f"    server {name} 127.0.0.1:{port} check" for name, port in ports.items())
    return f"""global
    maxconn 4096
    stats socket {sock} mode 600 level admin
    log stdout format raw local0
defaults
    mode http
    log global
    log-format "{_LOG_TAG} %s %ST %tsc %rc %Ta %[date(0,ms)]"
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check {timeout}s
    retries 3
    option redispatch 1
    option http-server-close
frontend ingress
    bind 127.0.0.1:{front}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter {period}s fall {fall} rise {rise}
{servers}
"""


@contextlib.contextmanager
def run_haproxy(
    ports: dict[str, int], folder: Path, readiness: dict[str, Any]
) -> Iterator[Balancer]:
    """HAProxy in the foreground on a free loopback port in front of ``ports``."""
    exe = shutil.which("haproxy")
    if exe is None:
        raise RuntimeError("haproxy is not installed: apt-get install -y haproxy")
    front, sock = free_port(), folder / "haproxy.sock"
    config = folder / "haproxy.cfg"
    config.write_text(_haproxy_config(ports, front, sock, readiness))
    subprocess.run([exe, "-c", "-q", "-f", str(config)], check=True)
    log = folder / "haproxy.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [exe, "-db", "-f", str(config)], stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    balancer = Balancer(f"http://127.0.0.1:{front}", sock, process, log)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        watcher = threading.Thread(target=balancer.watch, args=(stop,), daemon=True)
        watcher.start()
        yield balancer
    finally:
        stop.set()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait(what: str, done: Callable[[], bool], timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.time()


# --- the traffic ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    start: float
    end: float
    status: int
    error: str

    @property
    def refused(self) -> bool:
        """Told 503 ``overloaded`` (with Retry-After): the admission limit, by design."""
        return self.status == 503 and "overloaded" in self.error

    @property
    def failed(self) -> bool:
        return bool(self.error) and not self.refused


def _read_log(path: Path) -> list[Request]:
    requests = []
    for line in path.read_text().splitlines():
        start, end, status, *error = line.split(" ")
        requests.append(Request(float(start), float(end), int(status), " ".join(error).strip()))
    return requests


@contextlib.contextmanager
def run_locust(url: str, users: int, folder: Path, name: str = "requests") -> Iterator[Path]:
    """Headless locust with ``users`` back-to-back clients until the block ends; yields the
    request log it writes (``name``.log)."""
    log, out = folder / f"{name}.log", folder / f"locust-{name}.log"
    log.touch()
    command = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "rehearsal_users.py"),
               "--headless", "--host", url, "-u", str(users), "-r", str(users),
               "--run-time", "30m", "--only-summary", "--loglevel", "WARNING"]  # fmt: skip
    env = {**os.environ, "REHEARSAL_LOG": str(log), "PYTHONPATH": str(REPO)}
    with out.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# --- the rehearsal -------------------------------------------------------------------------------
def _start(names: list[str], ports: dict[str, int], env: dict[str, str], folder: Path,
           stack: contextlib.ExitStack) -> dict[str, Server]:  # fmt: skip
    """Start replicas concurrently (as a Deployment's pods start); each stops with the stack."""
    managers = {name: serve(env, folder, port=ports[name]) for name in names}
    with ThreadPoolExecutor(len(names)) as pool:
        started = dict(zip(names, pool.map(lambda n: managers[n].__enter__(), names), strict=True))
    for name in names:
        stack.push(managers[name].__exit__)
    return started


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_pod(pid: int) -> list[psutil.Process]:
    """SIGKILL a replica's every process at once, as the kernel kills a container's PID
    namespace (BentoML's workers run in sessions of their own: the arbiter's process group
    alone would leave them serving)."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    return tree


def _keda_value(prom: Prometheus, query: str) -> float:
    return prom.scalar(query) or 0.0


def rehearse(
    folder: Path,
    *,
    users: int = 128,
    warm_s: float = 15.0,
    after_term_s: float = 5.0,
    after_kill_s: float = 8.0,
    burst_users: int = 128,
    burst_s: float = 30.0,
    rest_timeout_s: float = 120.0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole rehearsal in ``folder``; return its report (see the module docstring)."""
    ship = shipped()
    env = {
        **ship.env,
        # Four pods share this machine's two cores (a pod would have its own CPU quota, which
        # the service sizes itself to): one worker and one torch thread each.
        "VIT_WORKERS": "1",
        "VIT_TORCH_THREADS": "1",
        "VIT_ACCESS_LOG": "false",
    }
    names = ["r0", "r1", "r2", "surge"]
    ports = {name: free_port() for name in names}
    # Hold the surge replica's port until it starts (bound, not listening: the balancer's
    # checks are refused), so no other process picks it meanwhile; the replica binds beside it
    # (SO_REUSEPORT, as its workers do).
    placeholder = socket.socket()
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    placeholder.bind(("127.0.0.1", ports["surge"]))
    report: dict[str, Any] = {
        "users": users,
        "replicas": 3,
        "config": env,
        "readiness_probe": ship.readiness,
        "keda": {
            "query": ship.query,
            "threshold": ship.threshold,
            "activation": ship.activation,
            "min": ship.min_replicas,
            "max": ship.max_replicas,
        },
    }
    with contextlib.ExitStack() as stack:
        stack.callback(placeholder.close)
        say(f"starting 3 replicas ({env['VIT_WORKERS']} worker each) ...")
        servers = _start(names[:3], ports, env, folder, stack)
        balancer = stack.enter_context(run_haproxy(ports, folder, ship.readiness))
        _wait("the balancer sees r0-r2 up and the empty surge slot down",
              lambda: all(balancer.latest.get(n, {}).get("status") == "UP" for n in names[:3])
              and balancer.latest.get("surge", {}).get("status", "").startswith("DOWN"),
              60)  # fmt: skip
        prom = stack.enter_context(run_prometheus(
            [f"127.0.0.1:{port}" for port in ports.values()], folder, job=JOB, rule_files=(),
            labels={"service": SERVICE_LABEL},
        ))  # fmt: skip
        rest_before = _keda_value(prom, ship.query)
        load_from = time.time()
        with run_locust(balancer.url, users, folder) as log:
            time.sleep(warm_s)

            # A rolling update: the surge pod starts and turns ready, then r0 gets SIGTERM.
            say("rolling update: surge replica starting ...")
            servers |= _start(["surge"], ports, env, folder, stack)
            placeholder.close()
            _wait("the balancer sends to the surge replica",
                  lambda: balancer.status("surge") == "UP", 30)  # fmt: skip
            terminated = time.time()
            servers["r0"].process.send_signal(signal.SIGTERM)
            r0_status = servers["r0"].process.wait(timeout=ship.grace_s)
            r0_exited = time.time()
            say(f"r0 drained and exited ({r0_status}) {r0_exited - terminated:.1f} s after SIGTERM")
            time.sleep(after_term_s)

            # A crash: r1's processes are all killed at once, as the kernel kills a container.
            # In flight on r1 as it dies: the balancer's sessions on it (one per request in
            # flight: http-server-close leaves no idle ones), at most, from just before the
            # kill until its processes are gone (the kernel tears a process's memory down before
            # its sockets: requests sent meanwhile are accepted, then lost with it).
            in_flight = int(balancer.stat()["r1"]["scur"])
            killed = time.time()
            dying = _kill_pod(servers["r1"].process.pid)
            while any(map(_alive, dying)):
                in_flight = max(in_flight, int(balancer.stat()["r1"]["scur"]))
            servers["r1"].process.wait(timeout=10)
            in_flight = max(in_flight, int(balancer.stat()["r1"]["scur"]))
            marked_down = _wait("the balancer marks r1 down",
                                lambda: balancer.status("r1") != "UP", 60)  # fmt: skip
            time.sleep(after_kill_s)

            # More load than the two replicas left can batch: the scaling query must rise.
            burst_from = time.time()
            with run_locust(balancer.url, burst_users, folder, "burst") as burst_log:
                time.sleep(burst_s)
            under_load = _keda_value(prom, ship.query)
            load_to = time.time()
        stopped = time.time()
        peak = max((float(v) for _, v in _range(prom, ship.query, load_from, load_to)), default=0.0)
        rest_value, rest_at = under_load, stopped
        while time.time() < stopped + rest_timeout_s:
            rest_value, rest_at = _keda_value(prom, ship.query), time.time()
            if rest_value <= ship.activation:
                break
            time.sleep(2)
        counters = balancer.stat()
        dropped_logs = int(balancer.info().get("DroppedLogs", "0"))
        per_replica_metrics = prom.vector(
            'max by (instance) (max_over_time(vit_requests_total{endpoint="classify",'
            f'status="200",service="{SERVICE_LABEL}"}}[15m]))'
        )
        requests = _read_log(log)
        burst = _read_log(burst_log)
    routed = balancer.routed()

    r0_down = balancer.went("r0", "DOWN", terminated)
    term_window = [r for r in requests if r.failed and terminated - 1 <= r.end <= r0_exited + 1]
    # The crash's failures: those sent before the kill and unanswered at it, and those sent
    # after it that the dying replica still took (while its memory was torn down; its sockets
    # close last). All count against what it held as it died (``in_flight``).
    in_flight_failed = [r for r in requests if r.failed and r.start < killed <= r.end + 0.001]
    after_failed = [r for r in requests if r.failed and r.start >= killed]
    kill_window = in_flight_failed + after_failed
    others = [r for r in requests if r.failed and r not in kill_window and r not in term_window]
    refused = [r for r in requests if r.refused]
    r1 = counters["r1"]
    last_failure = max((r.end for r in requests if r.failed and r.end >= killed), default=None)
    report |= {
        "requests": {
            "total": len(requests),
            "ok": sum(not r.failed and not r.refused for r in requests),
            "refused_overloaded": sum(r.refused for r in requests),
            "failed": sum(r.failed for r in requests),
            "throughput_per_s": round(
                sum(not r.failed and not r.refused for r in requests)
                / max(load_to - load_from, 1e-9),
                1,
            ),
        },
        "per_replica": {
            name: {
                "balancer_requests": int(counters[name]["stot"]),
                "balancer_2xx": int(counters[name]["hrsp_2xx"]),
                "balancer_5xx": int(counters[name]["hrsp_5xx"]),
                "balancer_log_200": sum(r.server == name and r.answered for r in routed),
                "own_metrics_200": next(
                    (
                        int(v)
                        for labels, v in per_replica_metrics.items()
                        if dict(labels)["instance"].endswith(f":{ports[name]}")
                    ),
                    0,
                ),
            }
            for name in names
        },
        "sigterm": {
            "exit_status": r0_status,
            "exited_after_s": round(r0_exited - terminated, 2),
            "balancer_marked_down_after_s": None
            if r0_down is None
            else round(r0_down - terminated, 2),
            "failed_requests": len(term_window),
        },
        "sigkill": {
            "in_flight_at_kill": in_flight,
            "failed_sent_before_kill": len(in_flight_failed),
            "failed_sent_after_kill": len(after_failed),
            "resent_elsewhere": sum(r.retries.startswith("+") for r in routed if r.end >= killed),
            "failed_requests": len(kill_window),
            "failures_outside_kill": len(others),
            "balancer_counted_on_it": {
                key: int(r1.get(key) or 0)
                for key in ("srv_abrt", "cli_abrt", "eresp", "econ", "hrsp_5xx", "wretr", "wredis")
            },
            "balancer_marked_down_after_s": round(marked_down - killed, 2),
            "last_failure_after_s": None
            if last_failure is None
            else round(last_failure - killed, 3),
            "errors": sorted({f"{r.status} {r.error}" for r in kill_window}),
        },
        "burst": {
            "users": burst_users,
            "seconds": burst_s,
            "ok": sum(not r.failed and not r.refused for r in burst),
            "refused_overloaded": sum(r.refused for r in burst),
            "failed": sum(r.failed for r in burst),
            "main_users_refused_overloaded": len(refused),
            "main_users_refused_before_burst": sum(r.end < burst_from for r in refused),
        },
        "scaling": {
            "at_rest_before": rest_before,
            "under_load_peak": peak,
            "under_load_end": under_load,
            "at_rest_after": rest_value,
            "fell_after_s": round(rest_at - stopped, 1),
            "replicas_at_rest_before": ship.replicas_for(rest_before),
            "replicas_under_load_peak": ship.replicas_for(peak),
            "replicas_at_rest_after": ship.replicas_for(rest_value),
        },
        "balancer_dropped_log_lines": dropped_logs,
        "balancer_state_changes": [
            {"after_start_s": round(at - load_from, 2), "server": name, "status": status}
            for at, name, status in balancer.changes
        ],
    }
    return report


def _range(prom: Prometheus, query: str, start: float, end: float) -> list[tuple[float, str]]:
    answer = httpx.post(
        f"{prom.url}/api/v1/query_range",
        data={"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"},
        timeout=30,
    ).json()
    if answer.get("status") != "success":
        raise RuntimeError(f"query_range failed: {answer}")
    return [(float(t), v) for series in answer["data"]["result"] for t, v in series["values"]]


def summary(report: dict[str, Any]) -> str:
    """The report as the lines a person reads."""
    keda, scaling = report["keda"], report["scaling"]
    lines = [
        f"{report['replicas']} replicas + 1 surge behind HAProxy, {report['users']} locust users: "
        f"{report['requests']['ok']} ok, {report['requests']['failed']} failed "
        f"({report['requests']['throughput_per_s']} req/s)",
        "requests per replica (balancer 2xx / replica's own vit_requests_total 200): "
        + ", ".join(
            f"{name} {row['balancer_2xx']}/{row['own_metrics_200']}"
            for name, row in report["per_replica"].items()
        ),
        "SIGTERM (rolling update): exit {exit_status} after {exited_after_s} s, balancer marked it "
        "down after {balancer_marked_down_after_s} s, failed requests {failed_requests}".format(
            **report["sigterm"]
        ),
        "SIGKILL (crash): at most {in_flight_at_kill} in flight on it as it died; "
        "{failed_requests} failed ({failed_sent_before_kill} sent before the kill, "
        "{failed_sent_after_kill} after); {resent_elsewhere} refused and resent elsewhere; "
        "balancer marked it down after {balancer_marked_down_after_s} s, last failure "
        "{last_failure_after_s} s after the kill, failures elsewhere "
        "{failures_outside_kill}".format(**report["sigkill"]),
        "burst of {users} more users for {seconds:g} s: {ok} ok, {refused_overloaded} refused "
        "(503 overloaded, Retry-After), {failed} failed".format(**report["burst"]),
        f"KEDA query {keda['query']} (threshold {keda['threshold']:g}): at rest "
        f"{scaling['at_rest_before']:.1f} -> replicas {scaling['replicas_at_rest_before']}; "
        f"under load peak {scaling['under_load_peak']:.1f} -> replicas "
        f"{scaling['replicas_under_load_peak']}; at rest after {scaling['fell_after_s']} s "
        f"{scaling['at_rest_after']:.1f} -> replicas {scaling['replicas_at_rest_after']} "
        f"(replicas = clamp(ceil(value / {keda['threshold']:g}), {keda['min']}, {keda['max']}))",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "rehearsal.json")
    parser.add_argument("--work", type=Path, default=None, help="folder for logs (a temp one)")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vit-rehearsal-") as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        report = rehearse(folder, users=args.users)
    print(summary(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
