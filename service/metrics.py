"""The service's Prometheus metrics, served on ``/metrics`` beside BentoML's own.

``prometheus_client`` picks single- or multi-process storage when it is first imported, and
BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker only after importing the service module,
so the metric objects are made by ``create_metrics()`` from the service's constructor, never at
import time. Gauges declare how worker values combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DEVICE_STAGES", "STAGES", "Metrics", "create_metrics"]

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
    cache_lookups: Any
    cache_bytes: Any
    version_images: Any

    def __post_init__(self) -> None:
        # Label lookups cost more than the observations: each stage's child is resolved once,
        # on first use (a stage this process never runs gets no series).
        object.__setattr__(self, "_stages", {})

    def prepare(self, stages: tuple[str, ...] = (), endpoints: tuple[str, ...] = ()) -> None:
        """Make the series a request will write before the first request comes (at 0, as
        Prometheus advises for labels known in advance): in multiprocess mode a histogram's
        first child writes its ~20 samples into the worker's memory-mapped file, 0.4-0.7 ms
        each, which the first answer after ``/readyz`` would otherwise pay (ready means warm).
        Only ``stages`` this process runs: a stage never run gets no series."""
        for stage in stages:
            self._child(stage)
        for endpoint in endpoints:
            self.request_seconds.labels(endpoint=endpoint)

    def _child(self, stage: str) -> Any:
        stages: dict[str, Any] = self._stages  # type: ignore[attr-defined]
        child = stages.get(stage)
        if child is None:
            child = stages[stage] = self.stage_seconds.labels(stage=stage)
        return child

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage's duration."""
        self._child(stage).observe(seconds)


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
            "The model version a process serves (value 1; 0 once a newer one replaced it).",
            ["model", "version", "source", "dtype", "device"],
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
        cache_lookups=prom.Counter(
            "vit_cache_lookups",
            "Images looked up in the response cache: 'hit' (answered from it) or 'miss'.",
            ["result"],
            registry=registry,
        ),
        version_images=prom.Counter(
            "vit_version_images",
            "Images answered, by the model and the version that answered (a canary's share).",
            ["model", "version"],
            registry=registry,
        ),
        cache_bytes=prom.Gauge(
            "vit_cache_bytes",
            "Bytes the response caches hold (all HTTP workers).",
            multiprocess_mode="livesum",
            registry=registry,
        ),
    )
