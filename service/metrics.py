"""The service's Prometheus metrics, served on ``/metrics`` beside BentoML's own.

``prometheus_client`` picks single- or multi-process storage when it is first imported, and
BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker only after importing the service module,
so the metric objects are made by ``create_metrics()`` from the service's constructor, never at
import time. Gauges declare how worker values combine.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

__all__ = ["STAGES", "Metrics", "create_metrics", "drop_unknown_endpoints"]

STAGES = ("decode", "queue", "preprocess", "forward", "attention", "postprocess")

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
    images: Any
    image_errors: Any
    batch_size: Any
    batch_fill: Any
    inflight: Any
    queue_depth: Any
    model_info: Any
    gpu_memory: Any

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage's duration."""
        self.stage_seconds.labels(stage=stage).observe(seconds)


def create_metrics(max_batch_size: int) -> Metrics:
    """Create the metric objects (call once per worker, after BentoML set up multiprocess mode)."""
    import prometheus_client as prom

    batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, max_batch_size})
    return Metrics(
        stage_seconds=prom.Histogram(
            "vit_stage_duration_seconds",
            "Time spent per pipeline stage (decode/queue/postprocess per image; "
            "preprocess/forward/attention per batch).",
            ["stage"],
            buckets=_SECONDS_BUCKETS,
        ),
        request_seconds=prom.Histogram(
            "vit_request_duration_seconds",
            "End-to-end handling time of classification requests.",
            ["endpoint"],
            buckets=_SECONDS_BUCKETS,
        ),
        images=prom.Counter(
            "vit_images",
            "Images received, by outcome.",
            ["outcome"],
        ),
        image_errors=prom.Counter(
            "vit_image_errors",
            "Images or requests refused, by error code.",
            ["code"],
        ),
        batch_size=prom.Histogram(
            "vit_batch_size",
            "Images per forward pass.",
            buckets=[b for b in batch_buckets if b <= max_batch_size],
        ),
        batch_fill=prom.Histogram(
            "vit_batch_fill_ratio",
            "Images per forward pass divided by the maximum batch size.",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
        ),
        inflight=prom.Gauge(
            "vit_inflight_requests",
            "Classification requests being handled.",
            multiprocess_mode="livesum",
        ),
        queue_depth=prom.Gauge(
            "vit_queue_images",
            "Images waiting for the model.",
            multiprocess_mode="livesum",
        ),
        model_info=prom.Gauge(
            "vit_model_info",
            "The loaded model (value 1).",
            ["model", "source", "dtype", "device"],
            multiprocess_mode="liveall",
        ),
        gpu_memory=prom.Gauge(
            "vit_gpu_memory_bytes",
            "CUDA memory held by PyTorch.",
            ["kind"],
            multiprocess_mode="livesum",
        ),
    )


_ENDPOINT = re.compile(r'endpoint="([^"]*)"')


def drop_unknown_endpoints(exposition: str, known: Collection[str]) -> str:
    """Remove BentoML traffic series whose ``endpoint`` label is not a real route.

    BentoML's HTTP traffic metrics label every request with its raw path, so a scan of random
    URLs would add a series per URL; only routes the service serves are exposed.
    """
    kept = []
    for line in exposition.splitlines(keepends=True):
        match = _ENDPOINT.search(line) if line.startswith("bentoml_") else None
        if match is None or match.group(1) in known:
            kept.append(line)
    return "".join(kept)
