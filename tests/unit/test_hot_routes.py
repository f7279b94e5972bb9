"""The hot routes skip BentoML's middleware but keep what it gave them: a request timeout
(504 JSON), a 500 JSON for an unexpected error, request counting; everything else passes on."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import prometheus_client
import pytest

import service.service as module
from service.metrics import create_metrics
from service.settings import Settings


class _Service:
    """Stands in for the VitClassifier instance of a worker."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.metrics = create_metrics(8, prometheus_client.CollectorRegistry())
        self.counted: list[tuple[bool, int]] = []
        self.codes: list[str] = []
        self.active = 0
        self.most_active = 0

    def admit(self) -> Any:
        if self.behaviour == "full":
            return module._overloaded("full")
        return None

    def refused(self, batch: bool, error: Any) -> None:
        self.count_request(batch, error.status)
        self.codes.append(error.code)

    async def _classify(self, request: Any, *, batch: bool) -> Any:
        self.most_active = max(self.most_active, self.active)
        if self.behaviour == "full":
            raise AssertionError("a refused request reached the handler")
        if self.behaviour == "slow":
            await asyncio.sleep(5)
        if self.behaviour == "broken":
            raise RuntimeError("a bug")
        return module.JsonResponse({"batch": batch})

    def count_request(self, batch: bool, status: int) -> None:
        self.counted.append((batch, status))


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    response = module.JsonResponse({"inner": scope["path"]})
    await response(scope, receive, send)


def _call(service: _Service, method: str, path: str) -> httpx.Response:
    app = module.hot_routes(_inner)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path)

    return asyncio.run(go())


@pytest.fixture
def serving(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    monkeypatch.setattr(module, "SETTINGS", Settings(request_timeout_s=1, access_log=False))
    slot: list[Any] = []
    monkeypatch.setattr(module, "_SERVING", slot)
    return slot


def test_hot_routes_reach_the_service_and_the_rest_passes_on(serving: list[Any]) -> None:
    serving.append(_Service("ok"))
    assert _call(serving[0], "POST", "/classify").json() == {"batch": False}
    assert _call(serving[0], "POST", "/classify_batch").json() == {"batch": True}
    for method, path in (("GET", "/classify"), ("GET", "/metrics"), ("POST", "/model")):
        assert _call(serving[0], method, path).json() == {"inner": path}


def test_before_the_service_exists_everything_passes_on(serving: list[Any]) -> None:
    assert _call(_Service("ok"), "POST", "/classify").json() == {"inner": "/classify"}


def test_a_slow_request_gets_a_504_json_at_the_timeout(serving: list[Any]) -> None:
    serving.append(_Service("slow"))
    response = _call(serving[0], "POST", "/classify")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "inference_timeout"
    assert serving[0].counted == [(False, 504)]
    assert serving[0].codes == ["inference_timeout"]
    assert serving[0].active == 0


def test_a_refused_request_is_answered_without_reading_its_body(serving: list[Any]) -> None:
    serving.append(_Service("full"))
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
        await module.hot_routes(_inner)(scope, receive, send)
        return sent

    sent = asyncio.run(go())
    assert received == []  # not a byte of the body was asked for
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]
    assert serving[0].codes == ["overloaded"] and serving[0].counted == [(False, 503)]


def test_admitted_requests_are_counted_while_in_flight(serving: list[Any]) -> None:
    serving.append(_Service("ok"))
    _call(serving[0], "POST", "/classify")
    assert serving[0].most_active == 1 and serving[0].active == 0


def test_an_unexpected_error_is_a_500_json(serving: list[Any]) -> None:
    serving.append(_Service("broken"))
    response = _call(serving[0], "POST", "/classify_batch")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert response.headers["x-request-id"]
    assert serving[0].counted == [(True, 500)]
    assert serving[0].active == 0


def test_with_tracing_on_nothing_is_bypassed(
    serving: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, "SETTINGS", Settings(tracing=True))
    serving.append(_Service("ok"))
    assert _call(serving[0], "POST", "/classify").json() == {"inner": "/classify"}


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
        transport = httpx.ASGITransport(app=module.hot_routes(_routing_error))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, headers={"X-Request-ID": "r-1"})

    response = asyncio.run(go())
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert path in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "r-1"
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_the_early_gate_refuses_at_the_headers_in_our_shape(serving: list[Any]) -> None:
    serving.append(_Service("full"))
    answer = module._refuse_early(b"POST", b"/classify_batch?top_k=2", [(b"x-request-id", b"r-9")])
    assert answer is not None
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1" in head and b"x-request-id: r-9" in head
    assert f"content-length: {len(body)}".encode() in head
    assert orjson.loads(body)["error"]["code"] == "overloaded"
    assert serving[0].counted == [(True, 503)] and serving[0].codes == ["overloaded"]
    # Anything else goes on to the app: other methods and paths, or a request it can admit.
    assert module._refuse_early(b"GET", b"/classify", []) is None
    assert module._refuse_early(b"POST", b"/model", []) is None
    serving[0] = _Service("ok")
    assert module._refuse_early(b"POST", b"/classify", []) is None
