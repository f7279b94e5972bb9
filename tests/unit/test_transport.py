"""The hop between HTTP workers and a model process: same answers, shared batches, one queue
bound for all workers, and a model process that goes away fails fast and comes back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import pytest

from service.errors import ApiError
from service.link import client as link_client
from service.link.client import ModelClient
from service.link.server import ModelServer
from service.link.wire import ipc_endpoint
from service.metrics import create_metrics
from service.model.imaging import decode_image
from service.model.runner import ModelRunner, Outcome, Work
from service.runtime.settings import Settings
from tests.utils import encode, make_tiny_dir

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "m"
    make_tiny_dir(folder)
    return folder


def _runner(model_dir: Path, **settings: Any) -> ModelRunner:
    metrics = create_metrics(32, prometheus_client.CollectorRegistry())
    config = Settings(model=f"local-dir:{model_dir}", max_wait_ms=0, **settings)
    return ModelRunner(config, metrics, device="cpu", threads=1)


class _Model:
    """A model process in a thread: a ModelServer on an ipc endpoint under tmp_path."""

    def __init__(self, runner: ModelRunner, endpoint: str) -> None:
        self.runner = runner
        self.server = ModelServer(runner, endpoint, {"pid": 0})
        self.thread = self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return ipc_endpoint(0, run_id=abs(hash(tmp_path)) % 10**9)


@pytest.fixture
def model(model_dir: Path, endpoint: str) -> Iterator[_Model]:
    running = _Model(_runner(model_dir), endpoint)
    yield running
    running.stop()


def _client(endpoint: str) -> ModelClient:
    metrics = create_metrics(32, prometheus_client.CollectorRegistry())
    return ModelClient([endpoint], metrics, queue_bound=Settings().max_queue_images)


async def _until(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


def _images(count: int) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(params=["ipc", "tcp"])
def any_endpoint(request: pytest.FixtureRequest, endpoint: str) -> str:
    """The private ipc socket, or TCP as when the model process runs as its own deployment."""
    if request.param == "ipc":
        return endpoint
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_answers_through_the_hop_match_the_model_in_process(
    model_dir: Path, any_endpoint: str
) -> None:
    model = _Model(_runner(model_dir), any_endpoint)
    try:
        _compare(model, any_endpoint)
    finally:
        model.stop()


def _compare(model: _Model, endpoint: str) -> None:
    images = _images(5)
    modes = ["cls", "none", "rollout", "cls", "none"]
    works = [Work(mode, pixels=img) for img, mode in zip(images, modes, strict=True)]  # type: ignore[arg-type]

    async def through_hop() -> list[Outcome | ApiError]:
        client = _client(endpoint)
        client.connect()
        await _until(lambda: client.ready)
        assert client.info.num_classes == model.runner.info.num_classes
        try:
            return await client.infer(works)
        finally:
            await client.aclose()

    remote = asyncio.run(through_hop())
    local = model.runner._engine.run(images, modes)
    for got, want, mode in zip(remote, local.items, modes, strict=True):
        assert isinstance(got, Outcome)
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
        if mode == "none":
            assert got.attention is None
        else:
            np.testing.assert_allclose(got.attention, want.attention, atol=1e-6)  # type: ignore[arg-type]


def _hold_the_model(runner: ModelRunner) -> tuple[threading.Event, list[int]]:
    """Make the model thread wait for ``release`` before each batch; record batch sizes."""
    release = threading.Event()
    sizes: list[int] = []

    def held(size: int) -> None:
        sizes.append(size)
        release.wait(20)

    runner.hold_batches(held)
    return release, sizes


def test_requests_from_two_http_workers_share_one_batch(model: _Model, endpoint: str) -> None:
    release, sizes = _hold_the_model(model.runner)

    async def scenario() -> list[list[Outcome | ApiError]]:
        first, second = _client(endpoint), _client(endpoint)
        for client in (first, second):
            client.connect()
        await _until(lambda: first.ready and second.ready)
        blocker = asyncio.ensure_future(first.infer([Work("none", pixels=_images(1)[0])]))
        await _until(lambda: sizes == [1])  # the model is busy with it
        a = asyncio.ensure_future(first.infer([Work("cls", pixels=img) for img in _images(2)]))
        b = asyncio.ensure_future(second.infer([Work("cls", pixels=_images(1)[0])]))
        await _until(lambda: model.runner.queued == 3)
        release.set()
        results = [await blocker, await a, await b]
        for client in (first, second):
            await client.aclose()
        return results

    _blocker, a, b = asyncio.run(scenario())
    assert sizes == [1, 3]
    assert [o.batch_size for o in a + b] == [3, 3, 3]  # type: ignore[union-attr]


def test_queue_bound_counts_images_from_every_http_worker(model_dir: Path, endpoint: str) -> None:
    running = _Model(_runner(model_dir, max_batch_size=1, max_queue_images=2), endpoint)
    release, sizes = _hold_the_model(running.runner)

    async def scenario() -> ApiError:
        first, second = _client(endpoint), _client(endpoint)
        for client in (first, second):
            client.connect()
        await _until(lambda: first.ready and second.ready)
        busy = asyncio.ensure_future(first.infer([Work("none", pixels=_images(1)[0])]))
        await _until(lambda: sizes == [1])
        queued = asyncio.ensure_future(first.infer([Work("none", pixels=_images(1)[0])]))
        await _until(lambda: running.runner.queued == 1)
        queued_too = asyncio.ensure_future(second.infer([Work("none", pixels=_images(1)[0])]))
        await _until(lambda: running.runner.queued == 2)
        with pytest.raises(ApiError) as refused:
            await second.infer([Work("none", pixels=_images(1)[0])])
        release.set()
        await asyncio.gather(busy, queued, queued_too)
        for client in (first, second):
            await client.aclose()
        return refused.value

    try:
        error = asyncio.run(scenario())
    finally:
        release.set()
        running.stop()
    assert (error.status, error.code) == (503, "overloaded")
    assert int(error.headers["Retry-After"]) >= 1


def test_a_worker_learns_the_model_queue_from_its_replies(
    model_dir: Path, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission in an HTTP worker sees the model process's whole queue, not only its own
    images: the replies report it, so once another worker has filled it this worker refuses
    at the headers instead of sending doomed pixels over; an old report ages out."""
    monkeypatch.setattr(link_client, "REPORT_TTL_S", 1.0)
    running = _Model(_runner(model_dir, max_batch_size=1, max_queue_images=2), endpoint)
    release, sizes = _hold_the_model(running.runner)

    full: dict[str, bool] = {}

    async def scenario() -> dict[str, int]:
        first, second = _client(endpoint), _client(endpoint)
        for client in (first, second):
            client.connect()
        await _until(lambda: first.ready and second.ready)
        seen: dict[str, int] = {}
        warm = await second.infer([Work("none", pixels=_images(1)[0])])  # a report: empty
        assert isinstance(warm[0], Outcome)
        seen["second, idle model"] = second.queued
        full["second, idle model"] = second.queue_full
        release.clear()
        busy = asyncio.ensure_future(first.infer([Work("none", pixels=_images(1)[0])]))
        await _until(lambda: len(sizes) == 2)
        queued = [
            asyncio.ensure_future(first.infer([Work("none", pixels=img)])) for img in _images(2)
        ]
        await _until(lambda: running.runner.queued == 2)
        seen["first, own images"] = first.queued  # sent since its last report: 3
        seen["second, before a reply"] = second.queued  # its report says the model was empty
        with pytest.raises(ApiError):  # sent, refused by the model: the reply says it is full
            await second.infer([Work("none", pixels=_images(1)[0])])
        seen["second, after the refusal"] = second.queued
        # Full by the bound the model process reported (2), not the client's own (512).
        full["second, after the refusal"] = second.queue_full
        release.set()
        await asyncio.gather(busy, *queued)
        seen["first, after its answers"] = first.queued
        await asyncio.sleep(1.1)
        seen["second, report aged out"] = second.queued
        full["second, report aged out"] = second.queue_full
        for client in (first, second):
            await client.aclose()
        return seen

    release.set()
    try:
        seen = asyncio.run(scenario())
    finally:
        release.set()
        running.stop()
    assert seen == {
        "second, idle model": 0,
        "first, own images": 3,
        "second, before a reply": 0,
        "second, after the refusal": 2,
        "first, after its answers": 0,
        "second, report aged out": 0,
    }
    assert full == {
        "second, idle model": False,
        "second, after the refusal": True,
        "second, report aged out": False,
    }


def test_a_model_process_that_goes_away_fails_fast_and_is_found_again(
    model_dir: Path, endpoint: str
) -> None:
    first = _Model(_runner(model_dir), endpoint)
    release, _sizes = _hold_the_model(first.runner)

    async def scenario() -> tuple[ApiError, float, ApiError, Outcome | ApiError]:
        client = _client(endpoint)
        client.connect()
        await _until(lambda: client.ready)
        in_flight = asyncio.ensure_future(client.infer([Work("none", pixels=_images(1)[0])]))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.to_thread(first.stop)  # the process dies with a request in flight
        with pytest.raises(ApiError) as failed:
            await in_flight
        waited = time.monotonic() - started
        await _until(lambda: not client.ready)
        with pytest.raises(ApiError) as refused:
            await client.infer([Work("none", pixels=_images(1)[0])])
        second = _Model(_runner(model_dir), endpoint)  # the restart
        try:
            await _until(lambda: client.ready)
            answer = (await client.infer([Work("cls", pixels=_images(1)[0])]))[0]
        finally:
            await client.aclose()
            await asyncio.to_thread(second.stop)
        return failed.value, waited, refused.value, answer

    try:
        failed, waited, refused, answer = asyncio.run(scenario())
    finally:
        release.set()
    assert (failed.status, failed.code) == (503, "not_ready")
    assert waited < 5
    assert (refused.status, refused.code) == (503, "not_ready")
    assert isinstance(answer, Outcome) and answer.attention is not None


def test_jpegs_decoded_on_the_device_match_pillow_and_bad_ones_get_the_4xx(
    model_dir: Path,
) -> None:
    runner = _runner(model_dir, device_decode="on")
    runner.load()
    assert runner.decodes_on_device
    smooth = np.linspace(0, 255, 96 * 80 * 3).reshape(96, 80, 3).astype(np.uint8)
    jpeg = encode(smooth, "JPEG", quality=95)
    cmyk = encode(smooth, "PNG")  # not a JPEG at all: the device decoder refuses it
    broken = jpeg[: len(jpeg) // 3]

    async def scenario() -> list[Outcome | ApiError]:
        works = [
            Work("cls", jpeg=jpeg),
            Work("cls", jpeg=cmyk),
            Work("cls", jpeg=broken),
            Work("cls", pixels=decode_image(jpeg, min_short_side=runner.info.resize_size).pixels),
        ]
        return await runner.infer(works)

    on_device, via_pillow_fallback, bad, pillow = asyncio.run(scenario())
    assert isinstance(on_device, Outcome) and isinstance(pillow, Outcome)
    assert isinstance(via_pillow_fallback, Outcome)
    np.testing.assert_allclose(on_device.probs, pillow.probs, atol=0.02)
    assert isinstance(bad, ApiError) and (bad.status, bad.code) == (400, "corrupt_image")
