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
  another replica and never re-sends a request a replica had taken; ``--resend-taken`` turns
  that on (HAProxy's ``retry-on conn-failure empty-response``, as an Envoy ``retry_on: reset``
  would: classifying an image has no side effect). Each request gets its own connection to a
  replica (``http-server-close``), so the balancer's sessions on a replica are exactly its
  requests in flight.
- **the Prometheus operator**: a real Prometheus scraping every replica, each series labelled
  ``service="vit-serve"`` as the ServiceMonitor's Service would;
- **KEDA**: the rendered ScaledObject's own PromQL (each trigger's), evaluated against that
  Prometheus, turned into the replica count KEDA's HPA would ask for: the largest of
  ``ceil(value / threshold)`` over the triggers (``AverageValue`` targets), clamped to
  ``[min, max]``, and ``min`` while every value is at or below its ``activationThreshold``;
- **traffic**: locust (``loadtests/rehearsal_users.py``) through the balancer.

During the load: a rolling update (the surge replica starts and turns ready, then one replica gets
SIGTERM and drains), a crash (every process of another replica gets SIGKILL, as the kernel kills
a container), then a burst of more users than the two replicas left can batch (past the
admission limit they are told 503 ``overloaded``, which counts as a refusal, not a failure).

What the crash costs is counted from both sides: the client's failed requests, and what the
replica held as it died by the balancer's counters for it (a snapshot just before the kill and
one after its last session ended): its sessions at the kill, plus the connections it still
accepted after it (the kernel tears a killed process's memory down before it closes its
sockets, ~0.1 s here), less those refused. Clients lose at most that; in runs here exactly that.
What it never answered is counted over its whole life (``_unanswered``), never from the
snapshot before the kill, which can catch a session answered but not yet closed.
HAProxy's log alone undercounts: a request that is not the first on the client's keep-alive
connection and finds its server gone is answered by closing the client's connection, with no
502 and no log line, so that the client may retry (``abort_keep_alive`` in HAProxy's
``http_ana.c``); locust does not retry a POST, so it counts a failure the log never shows.

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from harness.prometheus import Prometheus, run_prometheus
from harness.serving import REPO, Server, free_port, free_ports, serve

__all__ = ["Shipped", "rehearse", "shipped"]

KUSTOMIZE = REPO / "deploy" / "kubernetes"
SERVICE_LABEL = "vit-serve"  # the Service name a ServiceMonitor puts in `service`
JOB = "vit-serve-pods"


# --- what deploy/kubernetes ships ---------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    """One of the ScaledObject's Prometheus triggers."""

    name: str
    query: str  # its PromQL
    threshold: float
    activation: float


@dataclass(frozen=True)
class Shipped:
    """The rendered manifests' values the rehearsal runs with."""

    env: dict[str, str]  # the ConfigMap's VIT_* values
    readiness: dict[str, Any]  # the container's readinessProbe
    grace_s: int  # terminationGracePeriodSeconds
    triggers: tuple[Trigger, ...]  # the KEDA ScaledObject's
    min_replicas: int
    max_replicas: int

    def replicas_for(self, values: Sequence[float]) -> int:
        """What KEDA's HPA asks for at these values of the triggers' queries (in their order):
        the largest count of the AverageValue targets; the minimum while none is active."""
        wanted = [
            math.ceil(value / trigger.threshold)
            for trigger, value in zip(self.triggers, values, strict=True)
            if value > trigger.activation
        ]
        if not wanted:
            return self.min_replicas
        return max(self.min_replicas, min(self.max_replicas, max(wanted)))


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
    triggers = tuple(
        Trigger(
            name=t.get("name", f"trigger {i}"),
            query=t["metadata"]["query"],
            threshold=float(t["metadata"]["threshold"]),
            activation=float(t["metadata"].get("activationThreshold", 0)),
        )
        for i, t in enumerate(scaled["triggers"])
        if t["type"] == "prometheus"
    )
    return Shipped(
        env={k: str(v) for k, v in _one(base, "ConfigMap")["data"].items()},
        readiness=container["readinessProbe"],
        grace_s=int(pod["terminationGracePeriodSeconds"]),
        triggers=triggers,
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
    ports: dict[str, int],
    front: int,
    sock: Path,
    readiness: dict[str, Any],
    resend_taken: bool = False,
) -> str:
    period = int(readiness.get("periodSeconds", 10))
    timeout = int(readiness.get("timeoutSeconds", 1))
    fall = int(readiness.get("failureThreshold", 3))
    rise = int(readiness.get("successThreshold", 1))
    servers = "\n".join(f"    server {name} 127.0.0.1:{port} check" for name, port in ports.items())
    # Resending a request a replica took and dropped (L7 retries): safe here, classifying an
    # image has no side effect; the request must fit the balancer's buffer (tune.bufsize).
    resend = "    retry-on conn-failure empty-response\n" if resend_taken else ""
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
{resend}frontend ingress
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
    ports: dict[str, int], folder: Path, readiness: dict[str, Any], resend_taken: bool = False
) -> Iterator[Balancer]:
    """HAProxy in the foreground on a free loopback port in front of ``ports``; with
    ``resend_taken`` it also resends a request a server took and closed on unanswered."""
    exe = shutil.which("haproxy")
    if exe is None:
        raise RuntimeError("haproxy is not installed: apt-get install -y haproxy")
    front, sock = free_port(), folder / "haproxy.sock"
    config = folder / "haproxy.cfg"
    config.write_text(_haproxy_config(ports, front, sock, readiness, resend_taken))
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


_RESPONSE_KINDS = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


def _count(counters: dict[str, str], key: str) -> int:
    return int(counters.get(key) or 0)


def _accepted(counters: dict[str, str]) -> int:
    """The sessions a server took: connection attempts count as sessions, and those refused and
    then retried or resent elsewhere (wretr, wredis) or given up on (econ) never reached it."""
    return sum(sign * _count(counters, key) for sign, key in
               ((1, "stot"), (-1, "econ"), (-1, "wretr"), (-1, "wredis")))  # fmt: skip


def _unanswered(counters: dict[str, str]) -> int:
    """The sessions a server took over its whole life that ended with no response (those it
    answered and those still open aside). A request that was not the first on the client's
    keep-alive connection and found its server gone gets no HAProxy log line (HAProxy closes
    the client's connection so that the client may retry) but is counted here all the same."""
    answered = sum(_count(counters, f"hrsp_{kind}") for kind in _RESPONSE_KINDS)
    return _accepted(counters) - answered - _count(counters, "scur")


def _held(before: dict[str, str], after: dict[str, str]) -> dict[str, int]:
    """What a killed server held, from the balancer's counters for it just before the kill and
    once its last session was over: ``in_flight_at_kill`` (its sessions then),
    ``accepted_after_kill`` (connections it took after, not those it refused), ``held`` (their
    sum: an upper bound, as a session stays open a moment after its response is counted), and
    ``lost_per_balancer``: the sessions it never answered, over its whole life (each one before
    the kill was answered). Not a difference from the snapshot before the kill: that one can
    catch a session answered but not yet closed, which the difference counts as lost (58 lost
    against 57 failed requests, in one CI run)."""
    in_flight = _count(before, "scur")
    accepted = _accepted(after) - _accepted(before)
    return {
        "in_flight_at_kill": in_flight,
        "accepted_after_kill": accepted,
        "held": in_flight + accepted,
        "lost_per_balancer": _unanswered(after),
    }


def _keda_values(prom: Prometheus, triggers: Sequence[Trigger]) -> list[float]:
    return [prom.scalar(trigger.query) or 0.0 for trigger in triggers]


def rehearse(
    folder: Path,
    *,
    users: int = 128,
    warm_s: float = 15.0,
    after_term_s: float = 5.0,
    after_kill_s: float = 8.0,
    burst_users: int = 128,
    burst_s: float = 40.0,
    rest_timeout_s: float = 120.0,
    resend_taken: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole rehearsal in ``folder``; return its report (see the module docstring).
    ``resend_taken``: the balancer also resends what a replica took and dropped (L7 retries)."""
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
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    # Hold the surge replica's port until it starts (bound, not listening: the balancer's
    # checks are refused), so no other process picks it meanwhile; the replica binds beside it
    # (SO_REUSEPORT, as its workers do).
    placeholder = socket.socket()
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    placeholder.bind(("127.0.0.1", ports["surge"]))
    report: dict[str, Any] = {
        "users": users,
        "balancer_resends_taken_requests": resend_taken,
        "replicas": 3,
        "config": env,
        "readiness_probe": ship.readiness,
        "keda": {
            "triggers": [
                {
                    "name": t.name,
                    "query": t.query,
                    "threshold": t.threshold,
                    "activation": t.activation,
                }
                for t in ship.triggers
            ],
            "min": ship.min_replicas,
            "max": ship.max_replicas,
        },
    }
    with contextlib.ExitStack() as stack:
        stack.callback(placeholder.close)
        say(f"starting 3 replicas ({env['VIT_WORKERS']} worker each) ...")
        servers = _start(names[:3], ports, env, folder, stack)
        balancer = stack.enter_context(run_haproxy(ports, folder, ship.readiness, resend_taken))
        _wait("the balancer sees r0-r2 up and the empty surge slot down",
              lambda: all(balancer.latest.get(n, {}).get("status") == "UP" for n in names[:3])
              and balancer.latest.get("surge", {}).get("status", "").startswith("DOWN"),
              60)  # fmt: skip
        prom = stack.enter_context(run_prometheus(
            [f"127.0.0.1:{port}" for port in ports.values()], folder, job=JOB, rule_files=(),
            labels={"service": SERVICE_LABEL},
        ))  # fmt: skip
        rest_before = _keda_values(prom, ship.triggers)
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
            # What it held as it died, from the balancer's counters for it (one snapshot just
            # before the kill, one once it is marked down and its last session is over): its
            # sessions at the kill (one per request: http-server-close leaves no idle ones)
            # plus the connections it still accepted after (the kernel tears a process's memory
            # down before its sockets), less those refused (resent elsewhere).
            before_kill = balancer.stat()["r1"]
            killed = time.time()
            dying = _kill_pod(servers["r1"].process.pid)
            while any(map(_alive, dying)):
                time.sleep(0.005)
            servers["r1"].process.wait(timeout=10)
            marked_down = _wait("the balancer marks r1 down",
                                lambda: balancer.status("r1") != "UP", 60)  # fmt: skip
            _wait("the balancer's last session on r1 ends",
                  lambda: int(balancer.stat()["r1"]["scur"]) == 0, 30)  # fmt: skip
            after_kill = balancer.stat()["r1"]
            time.sleep(after_kill_s)

            # More load than the two replicas left can batch: the scaling queries must rise.
            burst_from = time.time()
            with run_locust(balancer.url, burst_users, folder, "burst") as burst_log:
                time.sleep(burst_s)
            under_load = _keda_values(prom, ship.triggers)
            load_to = time.time()
        stopped = time.time()
        peak = [
            max((float(v) for _, v in _range(prom, t.query, load_from, load_to)), default=0.0)
            for t in ship.triggers
        ]
        rest_value, rest_at = under_load, stopped
        while time.time() < stopped + rest_timeout_s:
            rest_value, rest_at = _keda_values(prom, ship.triggers), time.time()
            if all(v <= t.activation for v, t in zip(rest_value, ship.triggers, strict=True)):
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
    # after it that the dying replica still took. All count against what it held (``held``).
    in_flight_failed = [r for r in requests if r.failed and r.start < killed <= r.end + 0.001]
    after_failed = [r for r in requests if r.failed and r.start >= killed]
    kill_window = in_flight_failed + after_failed
    others = [r for r in requests if r.failed and r not in kill_window and r not in term_window]
    held = _held(before_kill, after_kill)
    refused = [r for r in requests if r.refused]
    r1 = counters["r1"]
    last_failure = max((r.end for r in requests if r.failed and r.end >= killed), default=None)
    last_failed_sent = max((r.start for r in kill_window), default=None)
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
                # Every 200 the replica sent, as logged; a few of them the client had given up
                # on (locust stopping its users mid-request), counted apart.
                "balancer_log_200": sum(r.server == name and r.status == 200 for r in routed),
                "balancer_log_200_client_gone": sum(
                    r.server == name and r.status == 200 and not r.answered for r in routed
                ),
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
            **held,
            "failed_sent_before_kill": len(in_flight_failed),
            "failed_sent_after_kill": len(after_failed),
            "resent_elsewhere": sum(r.retries.startswith("+") for r in routed if r.end >= killed),
            "failed_requests": len(kill_window),
            "failures_outside_kill": len(others),
            "balancer_counted_on_it": {
                key: int(r1.get(key) or 0)
                for key in (
                    "stot",
                    "srv_abrt",
                    "cli_abrt",
                    "eresp",
                    "econ",
                    "hrsp_5xx",
                    "wretr",
                    "wredis",
                )
            },
            "balancer_marked_down_after_s": round(marked_down - killed, 2),
            "last_failure_after_s": None
            if last_failure is None
            else round(last_failure - killed, 3),
            # Negative: sent before the kill.
            "last_failed_sent_after_s": None
            if last_failed_sent is None
            else round(last_failed_sent - killed, 3),
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

    def values(key: str) -> str:
        return ", ".join(
            f"{t['name']} {v:.1f}" for t, v in zip(keda["triggers"], scaling[key], strict=True)
        )

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
        "SIGKILL (crash): it held {held} ({in_flight_at_kill} in flight at the kill, "
        "{accepted_after_kill} accepted after it), {lost_per_balancer} unanswered per the "
        "balancer; clients: {failed_requests} failed ({failed_sent_before_kill} sent before "
        "the kill, {failed_sent_after_kill} after); {resent_elsewhere} resent elsewhere; "
        "balancer marked it down after {balancer_marked_down_after_s} s, last failure "
        "{last_failure_after_s} s after the kill (the last failed one sent at "
        "{last_failed_sent_after_s} s), failures elsewhere "
        "{failures_outside_kill}".format(**report["sigkill"]),
        "burst of {users} more users for {seconds:g} s: {ok} ok, {refused_overloaded} refused "
        "(503 overloaded, Retry-After), {failed} failed".format(**report["burst"]),
        "KEDA triggers: "
        + "; ".join(
            f"{t['name']} {t['query']} (threshold {t['threshold']:g})" for t in keda["triggers"]
        )
        + f"; at rest {values('at_rest_before')} -> replicas "
        f"{scaling['replicas_at_rest_before']}; under load peak {values('under_load_peak')} -> "
        f"replicas {scaling['replicas_under_load_peak']}; at rest after {scaling['fell_after_s']}"
        f" s {values('at_rest_after')} -> replicas {scaling['replicas_at_rest_after']} "
        f"(replicas = clamp(max ceil(value / threshold), {keda['min']}, {keda['max']}))",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument(
        "--resend-taken",
        action="store_true",
        help="the balancer also resends requests a replica took and dropped (L7 retries)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "rehearsal.json")
    parser.add_argument("--work", type=Path, default=None, help="folder for logs (a temp one)")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vit-rehearsal-") as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        report = rehearse(folder, users=args.users, resend_taken=args.resend_taken)
    print(summary(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
