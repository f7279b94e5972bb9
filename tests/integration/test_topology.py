"""The process layout under a real ``bentoml serve``: HTTP workers feeding one model process
(``split``), replicas, the event loop and parser really used, connections spread over workers,
shared batches, answers equal to the single-process ones, and a model process killed mid-load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.samples import digit
from harness.serving import Server, serve
from service.runtime.server import accept_queue, migrates_queued_connections
from tests.utils import assert_same_answer

SPLIT_ENV = {"VIT_TOPOLOGY": "split", "VIT_WORKERS": "2", "VIT_ACCESS_LOG": "false"}
TIMEOUT_S = 20


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The eager model here, so the answers test checks the split eager model against the
    # scripted single process. Its model can be held at a test gate (the batching test).
    folder = tmp_path_factory.mktemp("split")
    env = {
        **SPLIT_ENV,
        "VIT_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "VIT_TORCHSCRIPT": "false",
        "VIT_TEST_GATE": str(folder / "gate"),
    }
    with serve(env, folder) as running:
        yield running


def split_gate(server: Server) -> Path:
    """The file that holds the ``split`` server's model while it exists."""
    return server.log.parent / "gate"


def _runtime(url: str, client: httpx.Client | None = None) -> dict[str, Any]:
    response = (client or httpx).get(f"{url}/model", timeout=10)  # type: ignore[attr-defined]
    assert response.status_code == 200, response.text
    runtime: dict[str, Any] = response.json()["runtime"]
    return runtime


def _classify(client: httpx.Client, url: str, data: bytes, **fields: str) -> httpx.Response:
    return client.post(f"{url}/classify", files={"image": ("d.png", data)}, data=fields)


def test_the_server_runs_uvloop_and_httptools(server: Server, split: Server) -> None:
    for running in (server, split):
        runtime = _runtime(running.url)
        assert runtime["event_loop"] == "uvloop.Loop"
        # BentoML's default backlog, as far as net.core.somaxconn lets it (a warning if not).
        assert runtime["listen_backlog"] == accept_queue(2048)
        assert runtime["http_protocol"].endswith("httptools_impl.HttpToolsProtocol")
        assert runtime["tcp_migrate_req"] == migrates_queued_connections()


def test_default_on_two_cores_is_one_replica_per_core(server: Server) -> None:
    runtime = _runtime(server.url)
    cpus = runtime["cpus"]
    assert runtime["topology"] == "replicas"
    assert runtime["http_workers"] == min(cpus, 16)
    assert runtime["torch_threads"] * runtime["http_workers"] <= max(cpus, runtime["http_workers"])


def test_keep_alive_connections_spread_over_the_http_workers(split: Server) -> None:
    clients = [httpx.Client() for _ in range(32)]
    try:
        pids = Counter(_runtime(split.url, client)["pid"] for client in clients)
    finally:
        for client in clients:
            client.close()
    assert len(pids) == 2, pids
    assert min(pids.values()) >= 4, pids  # the kernel hashes; 0-3 of 32 has odds ~1e-6


def _clients_on_both_workers(url: str) -> tuple[httpx.Client, httpx.Client]:
    """Two keep-alive clients whose connections landed on different HTTP workers."""
    by_pid: dict[int, httpx.Client] = {}
    spare = []
    for _ in range(40):
        client = httpx.Client(timeout=TIMEOUT_S)
        pid = _runtime(url, client)["pid"]
        if pid in by_pid:
            spare.append(client)
        else:
            by_pid[pid] = client
        if len(by_pid) == 2:
            break
    for client in spare:
        client.close()
    assert len(by_pid) == 2, "every connection landed on one worker"
    first, second = by_pid.values()
    return first, second


def test_requests_from_two_http_workers_ride_in_one_batch(split: Server, tmp_path: Path) -> None:
    first, second = _clients_on_both_workers(split.url)
    images = [("images", (f"{i}.png", digit(i, 64, False))) for i in range(8)]
    gate = split_gate(split)

    async def once() -> tuple[int, int]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as busy:
            # Hold the model at its gate with one image in it, so that both requests queue
            # behind it in the model process; then release it: they leave together.
            gate.write_text("")
            hold = asyncio.ensure_future(
                busy.post(f"{split.url}/classify", files={"image": ("b.png", digit(9, 64, False))})
            )
            await _until(lambda: gate.read_text() == "held=1 queued=0\n")
            a = asyncio.ensure_future(
                asyncio.to_thread(first.post, f"{split.url}/classify_batch", files=images)
            )
            b = asyncio.ensure_future(
                asyncio.to_thread(second.post, f"{split.url}/classify_batch", files=images)
            )
            await _until(lambda: gate.read_text() == "held=1 queued=16\n")
            gate.unlink()
            first_answer, second_answer, held = await asyncio.gather(a, b, hold)
        assert held.status_code == first_answer.status_code == second_answer.status_code == 200
        return (
            first_answer.json()[0]["timing_ms"]["batch_size"],
            second_answer.json()[0]["timing_ms"]["batch_size"],
        )

    try:
        seen = [asyncio.run(once()) for _ in range(3)]
    finally:
        gate.unlink(missing_ok=True)
        first.close()
        second.close()
    # 8 + 8 images from two processes in one forward pass, every time.
    assert all(a == b == 16 for a, b in seen), seen


async def _until(condition: Any, timeout_s: float = TIMEOUT_S) -> None:
    """Poll ``condition`` (the gate file's report) until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError):
            if condition():
                return
        assert time.monotonic() < deadline, "the model's gate never reported the queue"
        await asyncio.sleep(0.005)


def test_split_answers_match_the_single_process_answers(server: Server, split: Server) -> None:
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for index in range(12):
            data = digit(index, 64 + 8 * (index % 3), index % 2 == 1)
            one = _classify(client, server.url, data, attention="rollout").json()
            two = _classify(client, split.url, data, attention="rollout").json()
            assert_same_answer(one, two)


def test_killing_the_model_process_mid_load_fails_fast_and_recovers(
    tmp_path: Path,
) -> None:
    env = {**SPLIT_ENV, "VIT_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    with serve(env, tmp_path) as running:
        model_pid = _runtime(running.url)["model_processes"][0]["pid"]
        data = digit(3, 64, False)
        outcomes: list[tuple[int, str, float]] = []

        async def scenario() -> None:
            # Kill once the load is answered, stop once it has met the model's absence.
            warm, failed_fast, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
            killed: list[bool] = []
            async with httpx.AsyncClient(timeout=TIMEOUT_S + 5) as client:

                async def user() -> None:
                    while not stop.is_set():
                        started = time.monotonic()
                        response = await client.post(
                            f"{running.url}/classify", files={"image": ("d.png", data)}
                        )
                        code = (
                            "" if response.status_code == 200 else response.json()["error"]["code"]
                        )
                        outcomes.append((response.status_code, code, time.monotonic() - started))
                        if len(outcomes) >= 8:
                            warm.set()
                        if killed and response.status_code == 503:
                            failed_fast.set()

                users = asyncio.gather(*(user() for _ in range(8)))
                await asyncio.wait_for(warm.wait(), TIMEOUT_S)
                os.kill(model_pid, signal.SIGKILL)
                killed.append(True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(failed_fast.wait(), TIMEOUT_S)
                stop.set()
                await users

        asyncio.run(scenario())
        statuses = Counter((status, code) for status, code, _ in outcomes)
        assert set(statuses) <= {(200, ""), (503, "not_ready")}, statuses
        assert statuses[(200, "")] > 0 and statuses[(503, "not_ready")] > 0, statuses
        assert max(elapsed for _, _, elapsed in outcomes) < TIMEOUT_S

        # Restarted by the server, no one touching it: ready and answering again.
        deadline = time.monotonic() + 120
        while True:
            ready = httpx.get(f"{running.url}/readyz", timeout=5).status_code == 200
            if ready:
                runtime = _runtime(running.url)
                if runtime["model_processes"] and all(
                    p["pid"] != model_pid for p in runtime["model_processes"]
                ):
                    break
            assert time.monotonic() < deadline, "the model process did not come back"
            time.sleep(0.5)
        with httpx.Client(timeout=TIMEOUT_S) as client:
            for _ in range(20):  # every HTTP worker reconnected
                assert _classify(client, running.url, data).status_code == 200


@pytest.mark.parametrize("workers", ["1", "2"])
def test_one_and_two_replicas_both_serve_a_fixed_load(tmp_path: Path, workers: str) -> None:
    env = {"VIT_TOPOLOGY": "replicas", "VIT_WORKERS": workers, "VIT_ACCESS_LOG": "false"}
    with serve(env, tmp_path) as running:

        async def drive() -> Counter[int]:
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                data = digit(5, 64, False)

                async def user() -> list[int]:
                    return [
                        (
                            await client.post(
                                f"{running.url}/classify",
                                files={"image": ("d.png", data)},
                                data={"attention": "none"},
                            )
                        ).status_code
                        for _ in range(25)
                    ]

                codes = await asyncio.gather(*(user() for _ in range(8)))
            return Counter(code for user_codes in codes for code in user_codes)

        assert asyncio.run(drive()) == Counter({200: 200})
        assert _runtime(running.url)["http_workers"] == int(workers)


def _each_answered(outcomes: list[tuple[int, str]], users: int, times: int) -> bool:
    """Whether each of ``users`` users has ``times`` 200 answers among ``outcomes``."""
    answered = Counter(index for index, kind in outcomes if kind == "200")
    return len(answered) == users and min(answered.values()) >= times


def _listeners(port: int) -> int:
    """Sockets listening on ``port`` on this host (``/proc/net/tcp``, state 0A)."""
    suffix = f":{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in lines:
                fields = line.split()
                count += fields[1].endswith(suffix) and fields[3] == "0A"
    return count


def _listener_closed(port: int, before: int, deadline_s: float = 30.0) -> float:
    """When one of the ``before`` sockets listening on ``port`` has closed, polled. A killed
    worker's sockets close only once its last thread has exited and its memory is unmapped
    (tens of ms), well after its pid shows as a zombie."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if _listeners(port) < before:
            return time.monotonic()
        time.sleep(0.0005)
    pytest.fail(f"no listener on {port} closed within {deadline_s} s of the kill")


def test_a_dying_http_worker_loses_only_its_own_in_flight_requests(tmp_path: Path) -> None:
    """A killed HTTP worker loses what it held: the requests in flight on its connections, and
    (unless the kernel migrates them, ``net.ipv4.tcp_migrate_req=1``) the connections queued on
    its listening socket until that socket closed with the process. A user loses the request on
    its connection to the victim, and a second one only if it reconnected before the victim's
    listening socket closed (with migration: never)."""
    env = {**SPLIT_ENV, "VIT_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    with serve(env, tmp_path) as running:
        data = digit(4, 64, False)
        victim: list[int] = []
        # (user, "200" | "503:<code>" | "lost", when it was sent)
        outcomes: list[tuple[int, str, float]] = []
        killed_at: list[int] = []  # len(outcomes) when the worker was killed
        moments: dict[str, float] = {}  # "killed", "gone"
        enough = asyncio.Event()

        async def user(index: int, stop: asyncio.Event) -> None:
            # One keep-alive connection per user: when its worker dies, only the request then
            # in flight on it may be lost; the next one reconnects (to a live worker).
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            async with httpx.AsyncClient(timeout=TIMEOUT_S + 5, limits=limits) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        response = await client.post(
                            f"{running.url}/classify", files={"image": ("d.png", data)}
                        )
                    except httpx.TransportError:
                        outcomes.append((index, "lost", sent))
                        continue
                    code = "" if response.status_code == 200 else response.json()["error"]["code"]
                    outcomes.append((index, f"{response.status_code}{code}", sent))
                    if len(outcomes) >= 8 and not killed_at:
                        enough.set()
                    pairs = (
                        [(i, kind) for i, kind, _ in outcomes[killed_at[0] :]] if killed_at else []
                    )
                    if killed_at and _each_answered(pairs, users=8, times=8):
                        enough.set()

        async def scenario() -> None:
            # Kill once the load is answered; stop once every user has 8 answers after it.
            stop = asyncio.Event()
            users = asyncio.gather(*(user(i, stop) for i in range(8)))
            await asyncio.wait_for(enough.wait(), TIMEOUT_S)
            enough.clear()
            victim.append(_runtime(running.url)["pid"])
            listening = _listeners(running.port)
            assert listening == 2, listening  # one socket per HTTP worker
            moments["killed"] = time.monotonic()
            os.kill(victim[0], signal.SIGKILL)
            killed_at.append(len(outcomes))
            gone = asyncio.get_running_loop().run_in_executor(
                None, _listener_closed, running.port, listening
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), 60)
            moments["gone"] = await gone
            stop.set()
            await users

        asyncio.run(scenario())
        kinds = Counter(kind for _, kind, _ in outcomes)
        assert set(kinds) <= {"200", "lost"}, kinds  # no 5xx from the survivor
        lost = [(index, sent) for index, kind, sent in outcomes if kind == "lost"]
        killed, gone = moments["killed"], moments["gone"]
        print(
            f"\nthe worker's listener closed {1e3 * (gone - killed):.1f} ms after SIGKILL; lost "
            f"(user, sent ms "
            f"after the kill): {[(i, round(1e3 * (t - killed), 1)) for i, t in lost]}; "
            f"tcp_migrate_req={migrates_queued_connections()}"
        )
        # A user's first loss is the request on its connection to the victim (in flight at the
        # kill, or sent on it before the client saw it break); a second one can only be a new
        # connection queued on the victim's listener before that socket closed.
        lost_per_user = Counter(index for index, _ in lost)
        later = [(i, t) for i, t in lost if t > min(s for j, s in lost if j == i)]
        assert all(sent < gone for _, sent in later), (later, gone)
        if migrates_queued_connections():
            assert all(count == 1 for count in lost_per_user.values()), lost_per_user
        assert kinds["200"] > 8 * max(1, len(lost_per_user)), kinds
        # The arbiter restarts the worker; both answer again.
        deadline = time.monotonic() + 120
        while True:
            clients = [httpx.Client() for _ in range(16)]
            try:
                pids = {_runtime(running.url, c)["pid"] for c in clients}
            finally:
                for c in clients:
                    c.close()
            if len(pids) == 2 and victim[0] not in pids:
                break
            assert time.monotonic() < deadline, pids
            time.sleep(0.5)
