"""The two tiers of ``deploy/kubernetes/overlays/split`` as two servers on 127.0.0.1: a model
server run on its own (``bentoml serve service.service:VitModel`` with ``VIT_MODEL_BIND``) and an
HTTP front that reaches it over TCP (``VIT_MODEL_ENDPOINTS``).

What the overlay relies on: the front answers what one server answers; the model server has its
own probes and metrics; a model server killed fails the front fast and a new one on the same
endpoint is found again; a frozen one is given up within the heartbeat timeout; the work spreads
over two model servers, a listed endpoint with nothing behind it (a StatefulSet ordinal scaled
away) does not hold readiness, and a model server stopped with SIGTERM (scaled in) loses no
request. Both tiers run with ``VIT_TOPOLOGY=auto``, so the plan for each tier is checked too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import ValidationError

from harness.samples import digit
from harness.serving import READY_PROBES, REPO, Server, free_ports, scrape, serve, serve_model
from service.runtime.plan import make_plan
from service.runtime.settings import Settings
from tests.utils import assert_same_answer

TIMEOUT_S = 20
# The model tier as the overlay runs it: nothing to drain for on its HTTP port (no load
# balancer sends it requests), so SIGTERM goes straight to telling the fronts to leave it.
MODEL_ENV = {"VIT_ACCESS_LOG": "false", "VIT_DRAIN_DELAY_S": "0"}
FRONT_ENV = {"VIT_ACCESS_LOG": "false", "VIT_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}


@dataclass(frozen=True)
class _Tiers:
    """A front and the model servers behind it."""

    front: Server
    models: list[Server]
    endpoints: list[str]


@contextlib.contextmanager
def _tiers(log_dir: Path, models: int, listed: int | None = None, **front: str) -> Iterator[_Tiers]:
    """``models`` model servers, and a front listing ``listed`` endpoints (the extra ones with
    nothing behind them)."""
    listed = listed or models
    ports = free_ports(listed + models)
    endpoints = [f"tcp://127.0.0.1:{port}" for port in ports[:listed]]
    with contextlib.ExitStack() as stack:
        running = [
            stack.enter_context(serve_model(MODEL_ENV, log_dir, bind=endpoint, port=port))
            for endpoint, port in zip(endpoints, ports[listed:], strict=False)
        ]
        env = {**FRONT_ENV, "VIT_MODEL_ENDPOINTS": ",".join(endpoints), **front}
        yield _Tiers(stack.enter_context(serve(env, log_dir)), running, endpoints)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Tiers]:
    with _tiers(tmp_path_factory.mktemp("remote"), models=1) as running:
        yield running


def _classify(client: httpx.Client, url: str, data: bytes, **fields: str) -> httpx.Response:
    return client.post(f"{url}/classify", files={"image": ("d.png", data)}, data=fields)


def _runtime(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/model", timeout=10)
    assert response.status_code == 200, response.text
    runtime: dict[str, Any] = response.json()["runtime"]
    return runtime


def _forward_passes(model: Server) -> float:
    return scrape(model.url).get("vit_batch_size_count", 0.0)


def _status(url: str, path: str) -> int:
    return httpx.get(f"{url}{path}", timeout=5).status_code


def _ready_everywhere(url: str) -> bool:
    """``/readyz`` 200 on ``READY_PROBES`` fresh connections in a row: the kernel spreads new
    connections over the HTTP workers, so every one of them has found the model again, not
    only the one a single probe met (then a request on another one was 503 ``not_ready``)."""
    return all(_status(url, "/readyz") == 200 for _ in range(READY_PROBES))


def _signal_all(server: Server, signum: int) -> None:
    """``signum`` to the server's main process and every process under it (BentoML starts its
    workers in sessions of their own): the whole container, as a pod sees it."""
    main = psutil.Process(server.process.pid)
    for process in [main, *main.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def _until(check: Any, timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.1)
    return time.monotonic() - started


def _load(
    url: str,
    during: Any,
    until: Any,
    users: int = 8,
) -> list[tuple[int, str, float]]:
    """``users`` clients posting /classify: ``during()`` runs once 8 answers have come, and the
    load goes on until ``until(outcomes since during() returned)`` holds (or ``TIMEOUT_S`` more
    pass); each outcome as (status, error code, seconds)."""
    data = digit(3, 64, False)
    outcomes: list[tuple[int, str, float]] = []
    warm, done, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    after: list[int] = []  # len(outcomes) once during() has returned

    async def user(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = await client.post(f"{url}/classify", files={"image": ("d.png", data)})
            code = "" if response.status_code == 200 else response.json()["error"]["code"]
            outcomes.append((response.status_code, code, time.monotonic() - started))
            if len(outcomes) >= 8:
                warm.set()
            if after and until(outcomes[after[0] :]):
                done.set()

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S + 5) as client:
            users_done = asyncio.gather(*(user(client) for _ in range(users)))
            await asyncio.wait_for(warm.wait(), TIMEOUT_S)
            await asyncio.to_thread(during)
            after.append(len(outcomes))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), TIMEOUT_S)
            stop.set()
            await users_done

    asyncio.run(scenario())
    return outcomes


def _refused(outcomes: list[tuple[int, str, float]]) -> bool:
    """A 503 came: the front has met the model server's absence."""
    return any(status == 503 for status, _, _ in outcomes)


def _answered(count: int) -> Any:
    return lambda outcomes: sum(status == 200 for status, _, _ in outcomes) >= count


# --- one model server, one front -------------------------------------------------------------
def test_the_front_answers_what_one_server_answers(server: Server, remote: _Tiers) -> None:
    front, (model,) = remote.front, remote.models
    # Every HTTP worker is ready, not only the one whose 200 ended the wait for the server.
    assert [_status(front.url, "/readyz") for _ in range(16)] == [200] * 16
    before = _forward_passes(model)
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for index in range(12):
            data = digit(index, 64 + 8 * (index % 3), index % 2 == 1)
            plain = _classify(client, server.url, data, attention="rollout")
            split = _classify(client, front.url, data, attention="rollout")
            assert plain.status_code == split.status_code == 200, (plain.text, split.text)
            one, two = plain.json(), split.json()
            assert_same_answer(one, two)
    # The forward passes ran in the model server, and the hop was timed in the front.
    assert _forward_passes(model) > before
    assert scrape(front.url)['vit_stage_duration_seconds_count{stage="transport"}'] > 0


def test_each_tier_plans_for_a_host_of_its_own(remote: _Tiers) -> None:
    runtime = _runtime(remote.front.url)
    assert runtime["topology"] == "split"  # VIT_TOPOLOGY=auto: the endpoints decide
    assert runtime["http_workers"] == min(runtime["cpus"], 16)  # no model process beside them
    (model_process,) = runtime["model_processes"]
    assert model_process["device"] == "cpu"
    assert model_process["torch_threads"] == runtime["cpus"]  # no HTTP worker beside it
    assert model_process["forward"] == "torchscript"  # a float32 model on the CPU


def test_the_model_server_answers_its_own_probes_and_metrics(remote: _Tiers) -> None:
    (model,) = remote.models
    assert _status(model.url, "/readyz") == 200
    assert _status(model.url, "/livez") == 200
    status = httpx.post(f"{model.url}/status", json={}, timeout=5).json()
    assert status == {"ready": True, "device": "cpu", "queued": 0}
    series = scrape(model.url)
    assert "vit_queue_images" in series  # what the model tier's ScaledObject asks Prometheus
    assert any(key.startswith("vit_model_info{") for key in series)


def test_a_frozen_model_server_is_given_up_within_the_heartbeat(remote: _Tiers) -> None:
    """SIGSTOP (a hung process, a lost node: the TCP connection stays open, nothing answers):
    requests get 503 ``not_ready`` within the heartbeat timeout, not after the request timeout;
    SIGCONT: the front finds it again."""
    front, (model,) = remote.front, remote.models
    try:
        outcomes = _load(front.url, lambda: _signal_all(model, signal.SIGSTOP), _refused)
        statuses = Counter((status, code) for status, code, _ in outcomes)
        assert set(statuses) <= {(200, ""), (503, "not_ready")}, statuses
        assert statuses[(503, "not_ready")] > 0, statuses
        assert max(elapsed for _, _, elapsed in outcomes) < 8, statuses  # heartbeat: 3 s
        assert _status(front.url, "/readyz") == 503
    finally:
        _signal_all(model, signal.SIGCONT)
    _until(lambda: _ready_everywhere(front.url), 30, "not found again after SIGCONT")
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for _ in range(10):
            answer = _classify(client, front.url, digit(1, 64, False))
            assert answer.status_code == 200, answer.text


# --- a model server killed and replaced ------------------------------------------------------
def test_a_killed_model_server_fails_fast_and_its_replacement_is_found(tmp_path: Path) -> None:
    """SIGKILL to the whole model server (a pod killed), then a new one on the same endpoint
    (the StatefulSet's replacement pod, under the same name)."""
    with _tiers(tmp_path, models=1) as tiers:
        front, (model,) = tiers.front, tiers.models
        outcomes = _load(front.url, lambda: _signal_all(model, signal.SIGKILL), _refused)
        statuses = Counter((status, code) for status, code, _ in outcomes)
        assert set(statuses) <= {(200, ""), (503, "not_ready")}, statuses
        assert statuses[(200, "")] > 0 and statuses[(503, "not_ready")] > 0, statuses
        assert max(elapsed for _, _, elapsed in outcomes) < 2, statuses
        assert _status(front.url, "/readyz") == 503
        assert _status(front.url, "/livez") == 200  # the front stays up: no restart needed
        assert "went away" in front.log_text()

        with serve_model(MODEL_ENV, tmp_path, bind=tiers.endpoints[0]) as replacement:
            took = _until(lambda: _ready_everywhere(front.url), 30, "not found again")
            assert took < 5, took  # reconnect attempts every second at most
            with httpx.Client(timeout=TIMEOUT_S) as client:
                for _ in range(20):  # every HTTP worker reconnected
                    answer = _classify(client, front.url, digit(2, 64, False))
                    assert answer.status_code == 200, answer.text
            assert _forward_passes(replacement) > 0


def test_a_model_server_that_cannot_listen_exits_at_once_with_the_reason(tmp_path: Path) -> None:
    """Its endpoint taken (another process listens there): the model server exits non-zero as
    soon as it has found out, the way a failed load does, with the reason last; it does not
    stay up neither ready nor gone."""
    (port,) = free_ports(1)
    with socket.create_server(("127.0.0.1", port)):  # the endpoint, taken
        env = {
            **os.environ,
            **MODEL_ENV,
            "VIT_MODEL_BIND": f"tcp://127.0.0.1:{port}",
            "BENTOML_HOME": str(tmp_path / "home"),
            "BENTOML_DO_NOT_TRACK": "true",
        }
        (http_port,) = free_ports(1)
        command = [sys.executable, "-m", "bentoml", "serve", "service.service:VitModel",
                   "--host", "127.0.0.1", "--port", str(http_port)]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
        )
    log = done.stdout + done.stderr
    print(f"\nexit {done.returncode} after {time.monotonic() - started:.1f} s")
    assert done.returncode == 3, log[-2000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("vit-serve: the model process cannot listen on tcp://127.0.0.1:"), last
    assert "Address already in use" in last


# --- two model servers -----------------------------------------------------------------------
def test_two_model_servers_share_the_work_and_one_scaled_in_loses_nothing(tmp_path: Path) -> None:
    """Three endpoints listed, two served (the third: an ordinal scaled away): the front is
    ready, both get work; then one is stopped with SIGTERM under load (a scale-in): it tells
    the front to leave it, answers what it has, and exits; no request fails."""
    with _tiers(tmp_path, models=2, listed=3, VIT_WORKERS="1") as tiers:
        front, (first, second) = tiers.front, tiers.models
        assert _status(front.url, "/readyz") == 200
        _until(lambda: len(_runtime(front.url)["model_processes"]) == 2, 10, "one not seen")
        before = [_forward_passes(first), _forward_passes(second)]
        outcomes = _load(front.url, lambda: None, _answered(100))
        assert Counter(status for status, _, _ in outcomes) == Counter({200: len(outcomes)})
        assert _forward_passes(first) > before[0] and _forward_passes(second) > before[1]

        stopped: list[float] = []

        def scale_in() -> None:
            os.kill(second.process.pid, signal.SIGTERM)  # as the kubelet: the main process
            started = time.monotonic()
            second.process.wait(timeout=30)
            stopped.append(time.monotonic() - started)

        outcomes = _load(front.url, scale_in, _answered(16))
        assert Counter(status for status, _, _ in outcomes) == Counter({200: len(outcomes)})
        assert stopped and stopped[0] < 10, stopped  # not held until the grace period ends
        # Told to leave it before it closed: no "went away" as after a kill, no wait for the
        # grace period.
        assert "went away" not in front.log_text()
        assert "grace period over" not in second.log_text()
        assert _status(front.url, "/readyz") == 200  # the first one still serves


# --- the plan and the settings of a tier (no server) -----------------------------------------
def test_a_model_server_with_several_devices_is_refused() -> None:
    settings = Settings(model_bind="tcp://0.0.0.0:5555")
    with pytest.raises(ValueError, match="one model server per device"):
        make_plan(settings, cpus=16, cuda_devices=2, model_bytes=None)
    plan = make_plan(settings, cpus=16, cuda_devices=1, model_bytes=None)
    assert plan.devices == ("cuda:0",) and plan.torch_threads == 1


def test_endpoints_or_bind_with_replicas_are_refused() -> None:
    for field in ("model_endpoints", "model_bind"):
        endpoint: dict[str, Any] = {field: "tcp://vit-model-0.vit-model:5555"}
        with pytest.raises(ValidationError, match="VIT_TOPOLOGY=split"):
            Settings(topology="replicas", **endpoint)
