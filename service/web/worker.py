"""One HTTP worker process: what every front door shares.

``HttpWorker`` holds the worker's ``Models`` (a ``Backend`` each), its ``Admission`` and its
``Pipeline``, and
keeps each admitted request inside one envelope (``admitted``): in flight, timed and counted,
with the request deadline (504 ``inference_timeout``) and an unexpected error (500
``internal_error``) answered in our shape. A front door (the native API in ``routes.py``; the
Open Inference Protocol next) reads its own request, calls the pipeline, and writes its own
answer; it never touches the backend's kind, the counters or the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from ..backend import Backend, Models
from ..errors import ApiError
from ..metrics import Metrics
from ..runtime.drain import draining
from ..runtime.plan import Plan
from ..runtime.server import serving_runtime
from ..runtime.settings import Settings
from .admission import ENDPOINTS, GRPC_INFER, OIP_INFER, Admission
from .answers import describe_model, error_response
from .pipeline import Pipeline

__all__ = ["Envelope", "HttpWorker"]

_logger = logging.getLogger(__name__)


@dataclass
class Envelope:
    """One admitted request's answer, set by its front door (or by the envelope on failure)."""

    response: Response | None = None


class HttpWorker:
    """One HTTP worker: its models, admission, pipeline and request envelope.

    Args:
        settings: the service's settings.
        plan: the process plan (decode threads, and what ``GET /model`` reports).
        models: the models, local or remote.
        metrics: this process's metrics.
    """

    def __init__(self, settings: Settings, plan: Plan, models: Models, metrics: Metrics) -> None:
        self.settings = settings
        self.plan = plan
        self.models = models
        self.metrics = metrics
        self.admission = Admission(settings.concurrency_limit, self.models, metrics)
        self.pipeline = Pipeline(settings, metrics, plan.decode_threads)

    @property
    def backend(self) -> Backend:
        """The default model."""
        return self.models.default

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Before the worker listens: load the models or connect to them, warm the decoders."""
        await self.models.start()
        self.pipeline.warm()
        grpc = (GRPC_INFER,) if self.settings.grpc_port else ()
        endpoints = (*ENDPOINTS.values(), OIP_INFER, *grpc)
        self.metrics.prepare(stages=("decode", "postprocess"), endpoints=endpoints)

    async def is_ready(self) -> bool:
        """``/readyz``: every model is ready, and this process is not stopping."""
        return not draining() and await self.models.is_ready()

    async def close(self) -> None:
        """At the stop: the models close, the decode threads end."""
        await self.models.close()
        self.pipeline.close()

    # --- requests --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def admitted(
        self,
        endpoint: str,
        request_id: str,
        shape: Callable[[ApiError, str], Response] = error_response,
    ) -> AsyncIterator[Envelope]:
        """One admitted request (its place reserved: ``Admission.admit``, or the gate), inside
        the envelope every front door shares: in flight (``vit_inflight_requests``; its place
        released at the end), timed (``vit_request_duration_seconds``), counted
        (``vit_requests_total``); the request deadline (504) and an unexpected error (500) end
        the block with the envelope's ``response`` in our shape. The front door sets
        ``response`` in the block; ``shape`` writes the envelope's errors in its protocol."""
        admission, metrics = self.admission, self.metrics
        metrics.inflight.inc()
        started = time.perf_counter()
        envelope = Envelope()
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                await self.models.first_contact()
                yield envelope
        except TimeoutError:
            message = f"Not answered within {self.settings.request_timeout_s} s; retry later."
            error = ApiError(504, "inference_timeout", message)
            envelope.response = self._failed(endpoint, request_id, error, shape)
        except Exception:
            _logger.exception("unexpected error on %s", endpoint)
            failure = ApiError(500, "internal_error", "Unexpected server error; see the log.")
            envelope.response = self._failed(endpoint, request_id, failure, shape)
        else:
            assert envelope.response is not None, "the front door set no response"
            admission.answered(endpoint, envelope.response.status_code)
        finally:
            admission.release()
            metrics.inflight.dec()
            metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _failed(
        self,
        endpoint: str,
        request_id: str,
        error: ApiError,
        shape: Callable[[ApiError, str], Response],
    ) -> Response:
        self.admission.refused(endpoint, error)
        return shape(error, request_id)

    async def describe(self, name: str | None = None) -> dict[str, Any]:
        """``GET /model``: the model ``name`` names (default: the default one) and this
        server's process layout.

        Raises:
            ApiError: 503 while no model is loaded; 404 for a name not served.
        """
        backend, plan = self.models.get(name), self.plan
        await backend.first_contact()  # a fresh worker: wait for its first word, as requests do
        runtime: dict[str, Any] = {
            "topology": plan.topology,
            "topology_reason": plan.reason,
            "http_workers": plan.http_workers,
            "pid": os.getpid(),
            "cpus": plan.cpus,
            "torch_threads": plan.torch_threads,
            "decode_threads": plan.decode_threads,
            **serving_runtime(),
            **backend.runtime(),
        }
        return describe_model(
            backend.info,
            self.settings,
            ready=backend.ready,
            warmup_ms=backend.warmup_ms,
            runtime=runtime,
        )
