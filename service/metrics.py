"""The service's Prometheus metrics, served on ``/metrics`` beside BentoML's own.

``prometheus_client`` picks single- or multi-process storage when it is first imported, and
BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker only after importing the service module,
so the metric objects are made by ``create_metrics()`` from the service's constructor, never at
import time. Gauges declare how worker values combine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEVICE_STAGES",
    "STAGES",
    "UNMATCHED_PATH",
    "Metrics",
    "bound_traffic_labels",
    "create_metrics",
]

STAGES = (
    "decode", "transport", "queue", "device_decode", "preprocess", "forward", "attention",
    "postprocess",
)  # fmt: skip
# Stages only a model decoding JPEGs on its device runs (VIT_DEVICE_DECODE).
DEVICE_STAGES = frozenset({"device_decode"})

# Millisecond work: 0.5 ms .. 10 s, roughly x2 per bucket.
_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class Metrics:
    """Handles to every metric the service writes."""

    stage_seconds: Any
    request_seconds: Any
    requests: Any
    images: Any
    image_errors: Any
    batch_size: Any
    batch_fill: Any
    inflight: Any
    queue_depth: Any
    model_info: Any
    gpu_memory: Any

    def __post_init__(self) -> None:
        # Label lookups cost more than the observations: each stage's child is resolved once,
        # on first use (a stage this process never runs gets no series).
        object.__setattr__(self, "_stages", {})

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage's duration."""
        stages: dict[str, Any] = self._stages  # type: ignore[attr-defined]
        child = stages.get(stage)
        if child is None:
            child = stages[stage] = self.stage_seconds.labels(stage=stage)
        child.observe(seconds)


def create_metrics(max_batch_size: int, registry: Any = None) -> Metrics:
    """Create the metric objects (call once per worker, after BentoML set up multiprocess mode).

    ``registry``: where to register them (default: prometheus_client's global one; tests pass
    a fresh ``CollectorRegistry``).
    """
    import prometheus_client as prom

    registry = prom.REGISTRY if registry is None else registry

    batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, max_batch_size})
    return Metrics(
        stage_seconds=prom.Histogram(
            "vit_stage_duration_seconds",
            "Time spent per pipeline stage (decode/queue/postprocess per image; "
            "device_decode/preprocess/forward/attention per batch; transport per message "
            "between an HTTP worker and a model process).",
            ["stage"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        ),
        request_seconds=prom.Histogram(
            "vit_request_duration_seconds",
            "End-to-end handling time of classification requests.",
            ["endpoint"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        ),
        requests=prom.Counter(
            "vit_requests",
            "Classification requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=registry,
        ),
        images=prom.Counter(
            "vit_images",
            "Images received, by outcome.",
            ["outcome"],
            registry=registry,
        ),
        image_errors=prom.Counter(
            "vit_image_errors",
            "Images or requests refused, by error code.",
            ["code"],
            registry=registry,
        ),
        batch_size=prom.Histogram(
            "vit_batch_size",
            "Images per forward pass.",
            buckets=[b for b in batch_buckets if b <= max_batch_size],
            registry=registry,
        ),
        batch_fill=prom.Histogram(
            "vit_batch_fill_ratio",
            "Images per forward pass divided by the maximum batch size.",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=registry,
        ),
        inflight=prom.Gauge(
            "vit_inflight_requests",
            "Classification requests being handled.",
            multiprocess_mode="livesum",
            registry=registry,
        ),
        queue_depth=prom.Gauge(
            "vit_queue_images",
            "Images waiting for the model.",
            multiprocess_mode="livesum",
            registry=registry,
        ),
        model_info=prom.Gauge(
            "vit_model_info",
            "The loaded model (value 1).",
            ["model", "source", "dtype", "device"],
            multiprocess_mode="liveall",
            registry=registry,
        ),
        gpu_memory=prom.Gauge(
            "vit_gpu_memory_bytes",
            "CUDA memory held by PyTorch.",
            ["kind"],
            multiprocess_mode="livesum",
            registry=registry,
        ),
    )


UNMATCHED_PATH = "/(unmatched)"
_ORIGINAL_PATH = "vit.original_path"


def bound_traffic_labels(known: Callable[[], Collection[str]]) -> None:
    """Make BentoML label its HTTP traffic metrics with a constant for paths that are no route.

    BentoML's ``RunnerTrafficMetricsMiddleware`` labels every request with its raw path and
    stores one series per label set in the multiprocess files, so a scan of random URLs grows
    them (and the time to render /metrics) without bound. The middleware is swapped, before the
    server builds its app, for a subclass that shows it ``UNMATCHED_PATH`` instead of an unknown
    path, while the request itself travels on with its real path (and still gets its 404).
    """
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "_vit_bounded", False):
        return

    class _RestorePath:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            original = scope.get(_ORIGINAL_PATH)
            if original is not None:
                scope = {**scope, "path": original}
            await self.app(scope, receive, send)

    class BoundedTrafficMetricsMiddleware(base):  # type: ignore[misc, valid-type]
        _vit_bounded = True

        def __init__(self, app: Any, **options: Any) -> None:
            super().__init__(_RestorePath(app), **options)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/metrics":
                await self._count_scrape(scope, receive, send)
                return
            if scope["type"].startswith("http") and scope["path"] not in known():
                scope = {**scope, "path": UNMATCHED_PATH, _ORIGINAL_PATH: scope["path"]}
            await super().__call__(scope, receive, send)

        async def _count_scrape(self, scope: Any, receive: Any, send: Any) -> None:
            # BentoML leaves its own scrape endpoint out of the traffic series; count it under
            # its own label like any route (a scrape shows in the next one).
            from bentoml._internal.context import server_context

            if not self._is_setup:
                self._setup()
            started, status = time.perf_counter(), [0]

            async def noting(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, receive, noting)
            labels = {
                "endpoint": "/metrics",
                "service_name": server_context.bento_name,
                "service_version": server_context.bento_version,
                "http_response_code": status[0],
                "runner_name": server_context.service_name,
            }
            self.metrics_request_total.labels(**labels).inc()
            self.metrics_request_duration.labels(**labels).observe(time.perf_counter() - started)

    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetricsMiddleware  # type: ignore[misc, assignment]
