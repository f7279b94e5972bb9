"""The hot routes skip BentoML's middleware but keep what it gave them: a request timeout
(504 JSON), a 500 JSON for an unexpected error, request counting; everything else passes on.

The front door and the worker are the real ones (``Front``, ``HttpWorker``), built from explicit
settings; only the model is a stand-in backend that answers, stalls, breaks or is full."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import orjson
import prometheus_client
import pytest

from service.backend import Models
from service.errors import ApiError
from service.metrics import Metrics, create_metrics
from service.model.engine import Outcome, Work
from service.model.loading import ModelInfo, load_model
from service.runtime.plan import make_plan
from service.runtime.settings import Settings
from service.web.routes import Front
from service.web.worker import HttpWorker
from tests.utils import encode, make_tiny_dir


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    folder = tmp_path_factory.mktemp("tiny") / "m"
    make_tiny_dir(folder)
    return load_model(f"local-dir:{folder}", device="cpu", dtype="float32").info


class _Backend:
    """Stands in for the model: ``ok`` answers, ``slow`` stalls, ``broken`` raises, ``full``
    has a full queue. Records how many requests were in flight when the model was asked."""

    warmup_ms = 0.0
    ready = True
    decodes_on_device = False

    def __init__(self, behaviour: str, info: ModelInfo) -> None:
        self.behaviour = behaviour
        self._info = info
        self.worker: HttpWorker | None = None
        self.most_active = 0

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def queue_full(self) -> bool:
        return self.behaviour == "full"

    async def start(self) -> None:
        return None

    async def is_ready(self) -> bool:
        return True

    async def first_contact(self) -> None:
        return None

    def arriving(self, count: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def route(self, key: str | None = None) -> ModelInfo:
        return self._info

    def versions(self) -> set[str]:
        return {self._info.version}

    async def infer(
        self, works: Sequence[Work], version: str | None = None
    ) -> list[Outcome | ApiError]:
        assert self.worker is not None
        self.most_active = max(self.most_active, self.worker.admission.active)
        if self.behaviour == "full":
            raise AssertionError("a refused request reached the model")
        if self.behaviour == "slow":
            await asyncio.sleep(5)
        if self.behaviour == "broken":
            raise RuntimeError("a bug")
        probs = np.full(self._info.num_classes, 1 / self._info.num_classes, dtype=np.float32)
        return [Outcome(probs, None, len(works), 1.0, 0.0) for _ in works]

    def runtime(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


class _Served:
    """A front door with a worker whose model is a ``_Backend``."""

    def __init__(self, behaviour: str, info: ModelInfo, **settings: Any) -> None:
        self.settings = Settings(request_timeout_s=1, access_log=False, **settings)
        plan = make_plan(self.settings, cpus=1, cuda_devices=0, model_bytes=0)
        self.metrics: Metrics = create_metrics(8, prometheus_client.CollectorRegistry())
        self.backend = _Backend(behaviour, info)
        self.worker = HttpWorker(self.settings, plan, Models([("", self.backend)]), self.metrics)
        self.backend.worker = self.worker
        self.front = Front(self.settings)
        self.front.attach(self.worker)

    def counted(self, endpoint: str, status: int) -> float:
        value = self.metrics.requests.labels(endpoint=endpoint, status=status)._value.get()
        return float(value)

    def codes(self, code: str) -> float:
        return float(self.metrics.image_errors.labels(code=code)._value.get())


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    body = orjson.dumps({"inner": scope["path"]})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


_IMAGE = encode(np.zeros((32, 32, 3), dtype=np.uint8))


def _call(front: Front, method: str, path: str, **kwargs: Any) -> httpx.Response:
    app = front.wrap(_inner)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _classify(front: Front, path: str = "/classify") -> httpx.Response:
    field = "images" if path == "/classify_batch" else "image"
    return _call(front, "POST", path, files={field: ("a.png", _IMAGE)})


@pytest.fixture
def served(info: ModelInfo) -> Iterator[Any]:
    made: list[_Served] = []

    def serve(behaviour: str, **settings: Any) -> _Served:
        made.append(_Served(behaviour, info, **settings))
        return made[-1]

    yield serve
    for each in made:
        each.worker.pipeline.close()


def test_hot_routes_reach_the_worker_and_the_rest_passes_on(served: Any) -> None:
    ok = served("ok")
    assert _classify(ok.front).json()["request_id"]
    batch = _classify(ok.front, "/classify_batch").json()
    assert [slot["index"] for slot in batch] == [0]
    for method, path in (("GET", "/classify"), ("GET", "/metrics"), ("POST", "/model")):
        assert _call(ok.front, method, path).json() == {"inner": path}


def test_before_the_worker_exists_everything_passes_on() -> None:
    front = Front(Settings())
    assert _call(front, "POST", "/classify").json() == {"inner": "/classify"}


def test_a_slow_request_gets_a_504_json_at_the_timeout(served: Any) -> None:
    slow = served("slow")
    response = _classify(slow.front)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "inference_timeout"
    assert slow.counted("classify", 504) == 1
    assert slow.codes("inference_timeout") == 1
    assert slow.worker.admission.active == 0


def test_a_refused_request_is_answered_without_reading_its_body(served: Any) -> None:
    full = served("full")
    received: list[Any] = []

    async def go() -> list[Any]:
        sent: list[Any] = []

        async def receive() -> Any:
            received.append(1)
            return {"type": "http.request", "body": b"x", "more_body": True}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [],
                 "query_string": b""}  # fmt: skip
        await full.front.wrap(_inner)(scope, receive, send)
        return sent

    sent = asyncio.run(go())
    assert received == []  # not a byte of the body was asked for
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]
    assert full.codes("overloaded") == 1 and full.counted("classify", 503) == 1


def test_admitted_requests_are_counted_while_in_flight(served: Any) -> None:
    ok = served("ok")
    assert _classify(ok.front).status_code == 200
    assert ok.backend.most_active == 1 and ok.worker.admission.active == 0


def test_an_unexpected_error_is_a_500_json(served: Any) -> None:
    broken = served("broken")
    response = _classify(broken.front, "/classify_batch")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert response.headers["x-request-id"]
    assert broken.counted("classify_batch", 500) == 1
    assert broken.worker.admission.active == 0


def test_with_tracing_on_nothing_is_bypassed(served: Any) -> None:
    ok = served("ok", tracing=True)
    assert _call(ok.front, "POST", "/classify").json() == {"inner": "/classify"}


async def _routing_error(scope: Any, receive: Any, send: Any) -> None:
    from starlette.responses import PlainTextResponse

    status = 405 if scope["path"] == "/classify" else 404
    headers = {"Allow": "POST"} if status == 405 else {}
    await PlainTextResponse("Nope", status_code=status, headers=headers)(scope, receive, send)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nowhere", 404, "not_found"), ("GET", "/classify", 405, "method_not_allowed")],
)
def test_routing_errors_are_answered_in_our_shape(
    method: str, path: str, status: int, code: str
) -> None:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=Front(Settings()).wrap(_routing_error))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, headers={"X-Request-ID": "r-1"})

    response = asyncio.run(go())
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert path in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "r-1"
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_the_early_gate_refuses_at_the_headers_in_our_shape(served: Any) -> None:
    full = served("full")

    def gate(method: bytes, url: bytes, headers: Any = ()) -> bytes | None:
        return full.front.gate(method, url, {"headers": list(headers)})

    answer = gate(b"POST", b"/classify_batch?top_k=2", [(b"x-request-id", b"r-9")])
    assert answer is not None
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1" in head and b"x-request-id: r-9" in head
    assert f"content-length: {len(body)}".encode() in head
    assert orjson.loads(body)["error"]["code"] == "overloaded"
    assert full.counted("classify_batch", 503) == 1 and full.codes("overloaded") == 1
    # Anything else goes on to the app: other methods and paths, or a request it can admit.
    assert gate(b"GET", b"/classify") is None
    assert gate(b"POST", b"/model") is None
    scope: dict[str, Any] = {"headers": []}
    ok = served("ok")
    assert ok.front.gate(b"POST", b"/classify", scope) is None
    assert scope["vit.reserved"] is True and ok.worker.admission.active == 1  # its place


def test_the_gate_is_off_while_tracing_and_before_the_worker_exists(served: Any) -> None:
    assert served("full", tracing=True).front.gate(b"POST", b"/classify", {"headers": []}) is None
    assert Front(Settings()).gate(b"POST", b"/classify", {"headers": []}) is None


def test_the_front_door_labels_the_api_bentomls_pages_and_the_protocols_routes() -> None:
    label = Front(Settings()).path_label
    for path in ("/classify", "/classify_batch", "/model", "/readyz", "/metrics", "/ui/", "/v2"):
        assert label(path) == path
    assert label("/nope") is None and label("/v2/nope") is None and label("/v2/models/") is None
    # One label per protocol route, whatever the model's name or version.
    assert label("/v2/models/vit-digits") == label("/v2/models/x") == "/v2/models/{model_name}"
    assert label("/v2/models/x/versions/7/infer") == (
        "/v2/models/{model_name}/versions/{model_version}/infer"
    )
    assert label("/v2/models/x/ready") == "/v2/models/{model_name}/ready"
    assert label("/v2/health/ready") == "/v2/health/ready"
