"""A new model version put in service by a real ``bentoml serve`` while clients keep sending, in
both topologies (two replicas; two HTTP workers and a model process): the load call reaches one
HTTP worker, every process that serves the model switches before it returns, nothing fails,
``/readyz`` never flaps, and the answers show the new weights. A process restarted later serves
what the others serve; a canary takes its share. The server serves a second model beside the
first (``VIT_MODELS``): it answers by its name, and each process holds both."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton

from harness.samples import digit
from harness.serving import Server, serve
from harness.versions import DIGITS_DIR, shifted_digits
from service.runtime.swaps import takes_canary

TOKEN = "integration-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = digit(7, 64, False)


@dataclass(frozen=True)
class Answer:
    start: float
    end: float
    status: int
    version: str | None
    top: str | None


@pytest.fixture(scope="module", params=["replicas", "split"])
def swap_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    second = shifted_digits(tmp_path_factory.mktemp("second"))
    env = {
        "VIT_MODELS": f"vit-digits=local-dir:{DIGITS_DIR},second={second}",
        "VIT_TOPOLOGY": request.param,
        "VIT_WORKERS": "2",
        "VIT_DTYPE": "float32",
        "VIT_ADMIN_TOKEN": TOKEN,
        "VIT_ACCESS_LOG": "false",
    }
    with serve(env, tmp_path_factory.mktemp("swap")) as running:
        yield running


def _ask(url: str, model: str = "vit-digits") -> Answer:
    """One request on a connection of its own (the kernel spreads connections over the two
    workers' sockets)."""
    start = time.time()
    try:
        response = httpx.post(
            f"{url}/classify", params={"model": model}, files={"image": ("d.png", IMAGE)},
            timeout=60,
        )  # fmt: skip
    except httpx.HTTPError:
        return Answer(start, time.time(), 0, None, None)
    end = time.time()
    if response.status_code != 200:
        return Answer(start, end, response.status_code, None, None)
    body = response.json()
    return Answer(start, end, 200, body["model"]["version"], body["predictions"][0]["label"])


def _next(top: str | None) -> str:
    """What the shifted head answers where the digits model answers ``top``: the next digit."""
    return str((int(str(top)) + 1) % 10)


def _load(url: str, source: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/repository/models/vit-digits/load",
        json={"parameters": {"source": source}},
        headers=AUTH,
        timeout=300,
    )


def test_two_models_answer_by_name_from_every_process(swap_server: Server) -> None:
    url = swap_server.url
    listed = httpx.get(f"{url}/models", timeout=30).json()["models"]
    assert [(m["name"], m["default"], m["state"]) for m in listed] == [
        ("vit-digits", True, "ready"),
        ("second", False, "ready"),
    ]
    # Fresh connections reach both HTTP workers (and, in split, the model process's two
    # sockets): the default answers the digit, ``second`` (the shifted head) the next one.
    first = {(a.status, a.version, a.top) for a in (_ask(url) for _ in range(12))}
    second = {(a.status, a.version, a.top) for a in (_ask(url, "second") for _ in range(12))}
    assert len(first) == 1 and next(iter(first))[:2] == (200, "1"), first
    assert second == {(200, "1", _next(next(iter(first))[2]))}
    unknown = httpx.post(f"{url}/classify?model=third", files={"image": ("d.png", IMAGE)})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
    with triton.InferenceServerClient(f"127.0.0.1:{swap_server.grpc_port}") as client:
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([IMAGE], dtype=np.object_))
        answer = client.infer("second", [image]).get_response()
        assert (answer.model_name, answer.model_version) == ("second", "1")
        assert client.get_model_metadata("second").name == "second"


def test_a_swap_under_load_fails_nothing_and_every_replica_switches(
    swap_server: Server, tmp_path: Path
) -> None:
    url = swap_server.url
    v1_top = _ask(url).top
    v2_source = shifted_digits(tmp_path / "v2")
    answers: list[Answer] = []
    probes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(_ask(url))

    def prober() -> None:
        while not stop.is_set():
            probes.append(httpx.get(f"{url}/readyz", timeout=10).status_code)
            time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(3)] + [
        threading.Thread(target=prober)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        called = time.time()
        response = _load(url, v2_source)
        returned = time.time()
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert response.status_code == 200, response.text
    done = response.json()
    assert done["version"] == "2" and done["source"] == v2_source
    processes = 1 if _topology(url) == "split" else 2  # the model processes, or the replicas
    assert sorted(r["replica"] for r in done["replicas"]) == list(range(processes))
    assert len({r["pid"] for r in done["replicas"]}) == processes
    # Nothing failed, the probes never left 200, and both versions answered.
    assert answers and all(a.status == 200 for a in answers), {a.status for a in answers}
    assert probes and set(probes) == {200}
    before = [a for a in answers if a.end < called]
    after = [a for a in answers if a.start > returned]
    assert before and after
    assert {(a.version, a.top) for a in before} == {("1", v1_top)}
    v2_top = _next(v1_top)
    assert {(a.version, a.top) for a in after} == {("2", v2_top)}
    # Fresh connections reach both workers: every one answers with version 2 now.
    assert {(a.version, a.top) for a in (_ask(url) for _ in range(20))} == {("2", v2_top)}
    index = httpx.post(f"{url}/v2/repository/index", headers=AUTH).json()
    assert index == [
        {"name": name, "version": version, "state": "READY", "reason": "",
         "traffic_percent": 100}
        for name, version in (("vit-digits", "2"), ("second", "1"))
    ]  # fmt: skip
    # The other model was left alone.
    assert {(a.version, a.top) for a in (_ask(url, "second") for _ in range(6))} == {
        ("1", _next(v1_top))
    }


def test_a_failed_load_keeps_the_version_serving_and_the_token_is_required(
    swap_server: Server, tmp_path: Path
) -> None:
    url = swap_server.url
    serving = _ask(url).version
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((DIGITS_DIR / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    response = _load(url, f"local-dir:{broken}")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith("load_failed: replica ") and f"Version {serving} serves on." in error
    assert {_ask(url).version for _ in range(10)} == {serving}
    assert httpx.get(f"{url}/readyz").status_code == 200
    for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 403)):
        refused = httpx.post(
            f"{url}/v2/repository/models/vit-digits/load",
            json={"parameters": {"source": f"local-dir:{DIGITS_DIR}"}},
            headers=headers,
        )
        assert refused.status_code == status
    assert {_ask(url).version for _ in range(10)} == {serving}


def _topology(url: str) -> str:
    return str(httpx.get(f"{url}/model", timeout=30).json()["runtime"]["topology"])


def _children(server: Server) -> set[int]:
    return {c.pid for c in psutil.Process(server.process.pid).children() if c.is_running()}


def _holder(server: Server) -> int:
    """A process that holds the model: a replica, or the model process (split)."""
    runtime = httpx.get(f"{server.url}/model", timeout=30).json()["runtime"]
    if runtime["topology"] == "split":
        return int(runtime["model_processes"][0]["pid"])
    return int(runtime["pid"])


def _pid_and_version(url: str) -> tuple[int, str] | None:
    """The worker a fresh connection lands on, and the model (name:version) it answers with."""
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            answer = client.post("/classify", files={"image": ("d.png", IMAGE)})
            described = client.get("/model")
    except httpx.TransportError:
        return None  # it met the killed worker
    if answer.status_code != 200 or described.status_code != 200:  # split: the model process
        return None  # is restarting (503 not_ready)
    pid = described.json()["runtime"]["pid"]
    model = answer.json()["model"]
    return int(pid), f"{model['name']}:{model['version']}"


def test_a_process_restarted_after_a_swap_serves_what_the_others_serve(
    swap_server: Server, tmp_path: Path
) -> None:
    url = swap_server.url
    split = _topology(url) == "split"
    response = _load(url, shifted_digits(tmp_path / "again"))
    assert response.status_code == 200, response.text
    version = response.json()["version"]
    before = _children(swap_server)
    os.kill(_holder(swap_server), signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:  # until the restarted process answers
        fresh = _children(swap_server) - before
        seen = {_pid_and_version(url) for _ in range(12)} - {None}
        answering = {pid for pid, _ in seen}  # type: ignore[union-attr]
        if fresh and (split or fresh <= answering) and seen:
            break
        assert time.monotonic() < deadline, (fresh, seen)
        time.sleep(0.2)
    # The respawned process loaded the version in serving.json (not VIT_MODEL's), under the
    # served name (not its source folder's).
    assert {v for _, v in seen} == {f"vit-digits:{version}"}  # type: ignore[misc]
    assert {_ask(url).version for _ in range(20)} == {version}
    # It holds the second model too.
    digit = _ask(url).top  # the shifted head's own answer (the version loaded above)
    assert {(a.status, a.top) for a in (_ask(url, "second") for _ in range(20))} == {(200, digit)}


def test_a_canary_takes_its_share_across_both_replicas(swap_server: Server, tmp_path: Path) -> None:
    url = swap_server.url
    stable = _ask(url).version
    body = {"parameters": {"source": f"local-dir:{DIGITS_DIR}", "canary_percent": 10}}
    response = httpx.post(f"{url}/v2/repository/models/vit-digits/load", json=body,
                          headers=AUTH, timeout=300)  # fmt: skip
    assert response.status_code == 200, response.text
    canary = response.json()["version"]
    assert response.json()["traffic"] == {stable: 90, canary: 10}
    versions: list[str] = []
    lock = threading.Lock()

    def send(count: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:  # keep-alive: one worker each
            for _ in range(count):
                answer = client.post("/classify", files={"image": ("d.png", IMAGE)})
                with lock:
                    versions.append(answer.json()["model"]["version"])

    threads = [threading.Thread(target=send, args=(250,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(versions) == 2000
    share = versions.count(canary) / len(versions)
    assert abs(share - 0.10) <= 0.03, share
    assert set(versions) == {stable, canary}
    # Over gRPC too: at random without a key, one version per key with one (x-client-key).
    with triton.InferenceServerClient(f"127.0.0.1:{swap_server.grpc_port}") as client:

        def grpc_version(key: str | None, pin: str = "") -> str:
            image = triton.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([IMAGE], dtype=np.object_))
            headers = None if key is None else {"x-client-key": key}
            answer = client.infer("vit-digits", [image], model_version=pin, headers=headers)
            return str(answer.get_response().model_version)

        assert {grpc_version(None) for _ in range(200)} == {stable, canary}
        keys = [f"client-{i}" for i in range(100)]
        to_canary = next(k for k in keys if takes_canary(k, 10))
        to_stable = next(k for k in keys if not takes_canary(k, 10))
        assert {grpc_version(to_canary) for _ in range(10)} == {canary}
        assert {grpc_version(to_stable) for _ in range(10)} == {stable}
        # A version asked by name answers, whatever the shares and the key.
        assert {grpc_version(to_stable, canary) for _ in range(10)} == {canary}
        assert {grpc_version(to_canary, stable) for _ in range(10)} == {stable}
    retired = httpx.post(f"{url}/v2/repository/models/vit-digits/traffic",
                         json={"parameters": {"canary_percent": 0}}, headers=AUTH)  # fmt: skip
    assert retired.status_code == 200 and retired.json()["traffic"] == {stable: 100}
    assert {_ask(url).version for _ in range(20)} == {stable}
