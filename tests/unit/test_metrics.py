"""Traffic-metric labels stay bounded: unknown paths are labelled with one constant."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bentoml._internal.server.http import instruments

from service import service
from service.runtime.server import UNMATCHED_PATH, install


def test_unknown_paths_get_one_label_and_keep_their_route() -> None:
    # Importing the service installed the seam, with the service's routes as the known paths.
    middleware_class = instruments.RunnerTrafficMetricsMiddleware
    assert middleware_class.__name__ == "BoundedTrafficMetricsMiddleware"

    seen_by_app: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen_by_app.append(scope["path"])
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    labels: list[str] = []

    class FakeMetric:
        """Stands in for BentoML's metrics client, so no real one is created in this process."""

        def labels(self, **kwargs: Any) -> FakeMetric:
            if "endpoint" in kwargs:
                labels.append(kwargs["endpoint"])
            return self

        def __getattr__(self, _name: str) -> Any:
            return lambda *args, **kwargs: contextlib.nullcontext()

    middleware = middleware_class(app, namespace="test")
    middleware._is_setup = True
    for name in ("metrics_request_total", "metrics_request_duration",
                 "metrics_request_in_progress", "metrics_last_request_timestamp"):  # fmt: skip
        setattr(middleware, name, FakeMetric())

    async def call(path: str) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(_message: Any) -> None:
            return None

        await middleware({"type": "http", "path": path, "method": "GET"}, receive, send)

    paths = ("/classify", "/nope/1", "/nope/2", "/v2/models/a/infer", "/v2/models/b/infer")
    for path in paths:
        asyncio.run(call(path))
    # in-progress and total both label each request; a protocol route by its template
    infer = "/v2/models/{model_name}/infer"
    assert set(labels) == {"/classify", UNMATCHED_PATH, infer}
    assert labels.count(UNMATCHED_PATH) == labels.count(infer) == 2 * labels.count("/classify")
    assert seen_by_app == list(paths)  # routing sees the real path
    install(service.SETTINGS, service.FRONT)  # a second install replaces nothing more
    assert instruments.RunnerTrafficMetricsMiddleware is middleware_class
