"""Hardening drills against a real ``bentoml serve``: stop under load, a worker killed, a model
that cannot load, slow clients, and refusal before the body is read. Each prints its figures.

Counting is strict: a request counts as *reset* when its bytes were written on an open
connection and no complete answer came back (including a keep-alive connection the server
closed just as the request went out); a connection the kernel refused is *refused* (nothing
was accepted, a load balancer would try elsewhere).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest

from harness.samples import digit, multipart
from harness.serving import REPO, Server, free_port, parse_exposition, serve
from service.runtime.server import refusal_delay


@dataclass
class Tally:
    """What a drill's clients saw, with the time of each outcome."""

    events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, at: float | None = None) -> None:
        with self.lock:
            self.events.append((time.monotonic() if at is None else at, kind))

    def counts(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        with self.lock:
            return Counter(kind for at, kind in self.events if since <= at < until)

    def wait_for(self, kind: str, count: int, since: float = 0.0, timeout_s: float = 60) -> None:
        """Wait until ``count`` outcomes of ``kind`` have come (since ``since``)."""
        deadline = time.monotonic() + timeout_s
        while self.counts(since=since)[kind] < count:
            assert time.monotonic() < deadline, f"not {count} x {kind!r}: {self.counts()}"
            time.sleep(0.01)


def _hammer(url: str, body: bytes, content_type: str, tally: Tally, stop: threading.Event) -> None:
    """One client: keep-alive POST /classify in a loop; reconnect when told to close."""
    host, port = url.removeprefix("http://").split(":")
    conn: http.client.HTTPConnection | None = None
    headers = {"Content-Type": content_type}
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.connect()
            except ConnectionRefusedError:
                tally.add("refused")
                conn = None
                time.sleep(0.05)
                continue
        try:
            conn.request("POST", "/classify", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (ConnectionError, http.client.HTTPException, OSError):
            tally.add("reset")
            conn.close()
            conn = None
            continue
        code = "" if response.status == 200 else orjson.loads(payload)["error"]["code"]
        tally.add(f"{response.status}{':' + code if code else ''}")
        if response.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


@contextlib.contextmanager
def _clients(url: str, count: int) -> Iterator[Tally]:
    body, content_type = multipart({}, [("image", "d.png", digit(3, 64, False))])
    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(target=_hammer, args=(url, body, content_type, tally, stop), daemon=True)
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    try:
        yield tally
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=40)


def _probe(url: str, tally: Tally, stop: threading.Event, path: str = "/readyz") -> None:
    """A fresh connection every 50 ms, as a kubelet probes; an answer is timed at its arrival,
    a probe that got none ("down") at its start (the moment its connection was made)."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            status = httpx.get(f"{url}{path}", timeout=2).status_code
            tally.add(str(status))
        except httpx.TransportError:
            tally.add("down", at=started)
        time.sleep(0.05)


@contextlib.contextmanager
def _probing(url: str) -> Iterator[Tally]:
    tally, stop = Tally(), threading.Event()
    thread = threading.Thread(target=_probe, args=(url, tally, stop), daemon=True)
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join(timeout=10)


# --- graceful stop ----------------------------------------------------------------------------
DRAIN_S = 2.0
GRACE_S = 12.0


@pytest.mark.parametrize("topology", ["replicas", "split"])
def test_sigterm_drains_under_load_and_resets_nothing(tmp_path: Path, topology: str) -> None:
    env = {
        "VIT_TOPOLOGY": topology,
        "VIT_WORKERS": "2",
        "VIT_ACCESS_LOG": "false",
        "VIT_DRAIN_DELAY_S": str(DRAIN_S),
        "VIT_GRACE_PERIOD_S": str(GRACE_S),
    }
    with (
        serve(env, tmp_path) as running,
        _probing(running.url) as ready,
        _clients(running.url, 16) as tally,
    ):
        tally.wait_for("200", 32)  # every client answered, about twice
        signalled = time.monotonic()
        running.process.send_signal(signal.SIGTERM)  # the arbiter only, as Docker/Kubernetes do
        status = running.process.wait(timeout=GRACE_S + 10)
        exited = time.monotonic()
        tally.wait_for("refused", 16, since=exited)  # clients now meet a closed port

    before, during = tally.counts(until=signalled), tally.counts(since=signalled, until=exited)
    unready = [at for at, kind in ready.events if at >= signalled and kind != "200"]
    print(
        f"\n[{topology}] before SIGTERM {dict(before)}; from SIGTERM to exit "
        f"({exited - signalled:.2f} s) {dict(during)}; after {dict(tally.counts(since=exited))}; "
        f"/readyz unready {unready[0] - signalled:.3f} s after the signal"
    )
    assert status == 0
    assert tally.counts()["reset"] == 0  # every accepted request was answered
    assert set(tally.counts()) <= {"200", "refused"}
    assert before["200"] > 0 and during["200"] > 0  # still admitting through the drain delay
    assert unready and unready[0] - signalled < 0.5
    assert DRAIN_S <= exited - signalled < GRACE_S


# --- a worker killed: no not_ready while a warm replica serves, readiness does not flap --------
def _worker_pids(arbiter: int) -> list[int]:
    return [child.pid for child in psutil.Process(arbiter).children() if child.is_running()]


def _pid_of(url: str) -> int | None:
    """The pid of the worker a new connection lands on (None: it met the killed one)."""
    try:
        with httpx.Client(timeout=10) as client:
            return int(client.get(f"{url}/model").json()["runtime"]["pid"])
    except httpx.TransportError:
        return None


def test_a_killed_replica_restarts_without_not_ready_or_flapping(tmp_path: Path) -> None:
    env = {"VIT_TOPOLOGY": "replicas", "VIT_WORKERS": "2", "VIT_ACCESS_LOG": "false"}
    with serve(env, tmp_path) as running:
        workers = _worker_pids(running.process.pid)
        assert len(workers) == 2, workers
        with _probing(running.url) as ready, _clients(running.url, 8) as tally:
            tally.wait_for("200", 16)
            killed = time.monotonic()
            os.kill(workers[0], signal.SIGKILL)
            deadline = killed + 60
            while True:  # until the restarted worker answers too
                fresh = set(_worker_pids(running.process.pid)) - set(workers)
                pids = {_pid_of(running.url) for _ in range(12)}
                if fresh and fresh <= pids:
                    break
                assert time.monotonic() < deadline, (fresh, pids)
                time.sleep(0.2)
            serving_again = time.monotonic()
            ready.wait_for("200", 20, since=serving_again)  # readiness a while longer

    counts = tally.counts()
    flaps = [kind for at, kind in ready.events if at >= killed and kind != "200"]
    # A probe whose connection the killed worker had accepted (or had in its own SO_REUSEPORT
    # queue) is reset with it, as any request there is: that is the kill, not readiness. Every
    # probe connected after the kill must answer 200.
    lost = [at - killed for at, kind in ready.events if kind == "down"]
    resets = [round(at - killed, 3) for at, kind in tally.events if kind == "reset"]
    print(
        f"\nworker killed; restarted one serving after {serving_again - killed:.1f} s; "
        f"answers {dict(counts)}; /readyz probes {len(ready.events)}, not 200 after the kill: "
        f"{len(flaps)}; probes lost with the killed worker: {len(lost)}; requests reset at "
        f"{resets} s after the kill"
    )
    assert counts["503:not_ready"] == 0
    assert flaps == []
    assert len(lost) <= 1 and all(at < 0 for at in lost), lost
    # Only requests on the killed worker's connections are lost: those in flight, and those on
    # connections the kernel still queued for it while the dying process was torn down (its
    # memory goes before its sockets, ~0.1 s here). Nothing is lost once it is gone.
    assert all(0 <= at < 1.0 for at in resets), resets
    assert set(counts) <= {"200", "reset"}


# --- the arbiter killed: its workers drain and go, never serve orphaned ------------------------
def test_workers_stop_when_the_arbiter_is_killed(tmp_path: Path) -> None:
    env = {"VIT_WORKERS": "2", "VIT_ACCESS_LOG": "false", "VIT_DRAIN_DELAY_S": "1"}
    with serve(env, tmp_path) as running:
        workers = [psutil.Process(pid) for pid in _worker_pids(running.process.pid)]
        assert len(workers) == 2
        time.sleep(1.0)
        assert all(worker.is_running() for worker in workers)  # not signalled by their start
        killed = time.monotonic()
        running.process.kill()  # SIGKILL to `bentoml serve` alone: its workers have own sessions
        running.process.wait(timeout=10)
        try:
            # They drain as on SIGTERM (their logs went to the dead arbiter): not ready at once,
            # still answering through the drain delay, then gone.
            deadline = killed + 0.9  # within the drain delay (1 s)
            while httpx.get(f"{running.url}/readyz", timeout=2).status_code != 503:
                assert time.monotonic() < deadline, "still ready after the arbiter died"
                time.sleep(0.02)
            assert httpx.get(f"{running.url}/livez", timeout=2).status_code == 200
            _, alive = psutil.wait_procs(workers, timeout=GRACE_S)
            stopped = time.monotonic()
            assert alive == [], [w.pid for w in alive]
            assert stopped - killed >= 1.0  # the drain delay
        finally:
            for worker in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.url}/livez", timeout=2)
    print(f"\narbiter killed; both workers drained and exited {stopped - killed:.2f} s later")


# --- a model that cannot load ------------------------------------------------------------------
def _truncated_model(folder: Path) -> str:
    source = REPO / "models" / "vit-digits"
    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    weights = (source / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return f"local-dir:{folder}"


@pytest.mark.parametrize("broken", ["missing-folder", "truncated-safetensors"])
def test_a_model_that_cannot_load_stops_the_server_with_the_reason(
    tmp_path: Path, broken: str
) -> None:
    model = (
        f"local-dir:{tmp_path / 'nowhere'}"
        if broken == "missing-folder"
        else _truncated_model(tmp_path / "half")
    )
    env = {
        **os.environ,
        "VIT_MODEL": model,
        "BENTOML_HOME": str(tmp_path / "home"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    command = [sys.executable, "-m", "bentoml", "serve", "service.service:VitClassifier",
               "--host", "127.0.0.1", "--port", str(free_port())]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    log = done.stdout + done.stderr
    print(f"\n[{broken}] exit {done.returncode} after {time.monotonic() - started:.1f} s")
    assert done.returncode == 3
    expected = "does not exist" if broken == "missing-folder" else "model.safetensors"
    last = log.strip().splitlines()[-1]
    assert last.startswith("vit-serve: the model failed to load:") and expected in last, last
    assert "[ERROR]" in log and "the model failed to load" in log


def test_with_on_load_failure_serve_the_error_is_in_every_503(tmp_path: Path) -> None:
    env = {"VIT_MODEL": _truncated_model(tmp_path / "half"), "VIT_ON_LOAD_FAILURE": "serve"}
    with serve(env, tmp_path, ready_path="/livez") as running:
        deadline = time.monotonic() + 60
        while True:
            response = httpx.post(
                f"{running.url}/classify", files={"image": ("d.png", digit(1, 64, False))}
            )
            if response.json()["error"]["code"] != "not_ready" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "load_failed"
        assert "model.safetensors" in error["message"] and "restart" in error["message"]
        assert "retry-after" not in response.headers  # nothing retries the load
        assert httpx.get(f"{running.url}/readyz").status_code == 503
        assert httpx.get(f"{running.url}/livez").status_code == 200
        assert running.process.poll() is None


# --- slow clients, and errors in our shape -----------------------------------------------------
@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "VIT_WORKERS": "1",
        "VIT_ACCESS_LOG": "false",
        "VIT_HEADER_TIMEOUT_S": "1",
        "VIT_BODY_TIMEOUT_S": "1",
        "VIT_MAX_CONCURRENCY": "2",
    }
    with serve(env, tmp_path_factory.mktemp("strict")) as running:
        yield running


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, orjson.loads(body)


def _metric(server: Server, key: str) -> float:
    series = parse_exposition(httpx.get(f"{server.url}/metrics").text)
    return series.get(key, 0.0)


def test_a_stalled_body_gets_408_body_timeout_and_is_counted(strict: Server) -> None:
    before = _metric(strict, 'vit_image_errors_total{code="body_timeout"}')
    body, content_type = multipart({}, [("image", "d.png", digit(2, 64, False))])
    with _connect(strict) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (content_type.encode(), len(body))
            + body[: len(body) // 2]
        )
        status, headers, answer = _read_answer(sock)
        waited = time.monotonic() - started
    assert status == 408 and answer["error"]["code"] == "body_timeout", answer
    assert headers["connection"] == "close"
    assert 1.0 <= waited < 5.0
    assert _metric(strict, 'vit_image_errors_total{code="body_timeout"}') == before + 1
    assert _metric(strict, 'vit_requests_total{endpoint="classify",status="408"}') >= 1


def test_slow_headers_get_408_header_timeout_and_others_are_served(strict: Server) -> None:
    slow = [_connect(strict) for _ in range(50)]
    try:
        for sock in slow:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        with httpx.Client(timeout=10) as client:
            good = client.post(
                f"{strict.url}/classify", files={"image": ("d.png", digit(1, 64, False))}
            )
        assert good.status_code == 200
        started = time.monotonic()
        answers = [_read_answer(sock) for sock in slow]
        waited = time.monotonic() - started
        assert all(sock.recv(1) == b"" for sock in slow)  # then closed
    finally:
        for sock in slow:
            sock.close()
    assert {(status, answer["error"]["code"]) for status, _, answer in answers} == {
        (408, "header_timeout")
    }
    print(f"\n50 slow-header connections closed with 408 within {waited:.2f} s of a good answer")
    assert waited < 3.0
    assert _metric(strict, 'vit_requests_total{endpoint="(headers)",status="408"}') >= 50


_HEAD = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"


@contextlib.contextmanager
def _worker_full(server: Server, body: bytes, content_type: str) -> Iterator[None]:
    """The ``strict`` worker at its limit (VIT_MAX_CONCURRENCY=2) for the block: two requests
    admitted, then stalled mid-body (until VIT_BODY_TIMEOUT_S ends them, 1 s)."""
    holders = [_connect(server) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(_HEAD % (content_type.encode(), len(body)) + body[:10])
        deadline = time.monotonic() + 0.9
        while _metric(server, "vit_inflight_requests") < 2:
            assert time.monotonic() < deadline, "the two stalled requests were not admitted"
            time.sleep(0.01)
        yield
    finally:
        for sock in holders:
            sock.close()


def test_a_refused_request_is_refused_before_its_body_is_read(strict: Server) -> None:
    """With 2 requests in flight per worker (VIT_MAX_CONCURRENCY=2), a third is told 503
    overloaded as soon as its headers arrive: its 4 MB body is never waited for. Each refusal
    is counted once, in the request and the error series."""
    body, content_type = multipart({}, [("image", "d.png", digit(2, 64, False))])
    series = ('vit_requests_total{endpoint="classify",status="503"}',
              'vit_image_errors_total{code="overloaded"}')  # fmt: skip
    before = [_metric(strict, key) for key in series]
    with _worker_full(strict, body, content_type):
        for request_id in ("first-refusal", "second-refusal"):
            with _connect(strict) as sock:
                started = time.monotonic()
                announced = _HEAD.replace(b"\r\n\r\n", b"\r\nX-Request-ID: %s\r\n\r\n")
                sock.sendall(announced % (content_type.encode(), 4_000_000, request_id.encode()))
                status, headers, answer = _read_answer(sock)
                waited = time.monotonic() - started
            assert status == 503 and answer["error"]["code"] == "overloaded", answer
            assert headers["retry-after"] == "1" and headers["x-request-id"] == request_id
            assert waited < 0.5
        assert [_metric(strict, key) - was for key, was in zip(series, before, strict=True)] == [
            2,
            2,
        ]


def test_an_open_inference_protocol_infer_is_refused_at_the_gate_in_its_shape(
    strict: Server,
) -> None:
    """``POST /v2/models/{name}/infer`` goes through the same gate: refused as soon as its
    headers arrive, in the protocol's error shape, counted under its own endpoint."""
    body, content_type = multipart({}, [("image", "d.png", digit(2, 64, False))])
    key = 'vit_requests_total{endpoint="oip_infer",status="503"}'
    before = _metric(strict, key)
    infer = _HEAD.replace(b"/classify", b"/v2/models/vit-digits/infer")
    with _worker_full(strict, body, content_type), _connect(strict) as sock:
        started = time.monotonic()
        sock.sendall(infer % (b"application/json", 4_000_000))
        status, headers, answer = _read_answer(sock)
        waited = time.monotonic() - started
    assert status == 503 and headers["retry-after"] == "1", answer
    assert list(answer) == ["error"] and answer["error"].startswith("overloaded: "), answer
    assert waited < 0.5
    assert _metric(strict, key) - before == 1


def test_metrics_scrapes_have_their_own_label(strict: Server) -> None:
    httpx.get(f"{strict.url}/metrics")
    text = httpx.get(f"{strict.url}/metrics").text
    scrapes = [line for line in text.splitlines() if 'endpoint="/metrics"' in line]
    assert scrapes and not any('endpoint="/(unmatched)"' in line for line in text.splitlines())


def test_refusals_in_a_row_on_one_connection_are_paced(strict: Server) -> None:
    """A client that resends the moment it is refused (ignoring Retry-After) is answered ever
    later on that connection: the first refusal at once, each next one after a growing wait
    (a timer: the worker spends nothing meanwhile); every refusal is counted."""
    body, content_type = multipart({}, [("image", "d.png", digit(2, 64, False))])
    request = _HEAD % (content_type.encode(), len(body)) + body
    key = 'vit_image_errors_total{code="overloaded"}'
    before = _metric(strict, key)
    waits: list[float] = []
    with _worker_full(strict, body, content_type), _connect(strict) as sock:
        for _ in range(4):
            started = time.monotonic()
            sock.sendall(request)
            status, _headers, answer = _read_answer(sock)
            waits.append(time.monotonic() - started)
            assert status == 503 and answer["error"]["code"] == "overloaded", answer
    paced = [refusal_delay(k) for k in (2, 3, 4)]
    print(f"\nrefusals in a row on one connection answered after {waits} s (paced {paced})")
    assert waits[0] < 0.5  # the first at once
    assert paced == sorted(paced) and paced[0] > 0
    for waited, pace in zip(waits[1:], paced, strict=True):
        assert waited >= 0.9 * pace, (waits, paced)
    assert _metric(strict, key) - before == 4
