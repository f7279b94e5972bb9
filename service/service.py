"""ViT Serve's composition root: the settings and the process plan, read once; the BentoML
services built from them; the server integration installed once.

Run with ``bentoml serve service.service:VitClassifier``. Which processes serve depends on the
plan (``service/runtime/plan.py``):

- ``replicas``: each HTTP worker (``vit-classifier``) runs its own model (``LocalBackend``);
- ``split``: ``vit-model``, a dependency run by the same ``bentoml serve`` with one worker
  process per device, owns the model, and the HTTP workers reach it over the link
  (``RemoteBackend``, ``service/link/``). Or, with ``VIT_MODEL_ENDPOINTS``, model processes
  run elsewhere (``bentoml serve service.service:VitModel`` with ``VIT_MODEL_BIND=tcp://...``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import bentoml
import prometheus_client
from bentoml import server_context

from .backend import create_backends
from .link.server import ModelServer
from .link.wire import ipc_endpoint
from .metrics import create_metrics
from .model.runner import ModelRunner, settle_heap
from .runtime.drain import DRAIN, draining
from .runtime.plan import Plan, plan_for
from .runtime.runfolder import model_folder, report_failure
from .runtime.runfolder import run_folder as folder
from .runtime.server import install
from .runtime.settings import Settings, load_settings
from .runtime.swaps import SwapBoard
from .web.admission import ENDPOINTS
from .web.routes import Front
from .web.worker import HttpWorker

__all__ = ["VitClassifier", "VitModel", "build"]

_logger = logging.getLogger(__name__)


def build(
    settings: Settings,
    plan: Plan,
    front: Front,
    *,
    registry: prometheus_client.CollectorRegistry | None = None,
    run_folder: Path | None = None,
) -> tuple[Any, Any]:
    """The model service and the HTTP service for ``settings`` and ``plan``.

    Args:
        front: the HTTP front door each HTTP worker attaches its worker to.
        registry: where the metrics go (default: prometheus_client's, as BentoML serves it).
        run_folder: where replicas keep their ready marks (default: the server's run folder).
    """

    if settings.canary_model and plan.topology == "split":
        raise ValueError(
            f"VIT_CANARY_MODEL needs the replicas topology; this host's plan is split "
            f"({plan.reason}): set VIT_TOPOLOGY=replicas or leave VIT_CANARY_MODEL empty"
        )

    def stop_or_serve(error: str) -> bool:
        """A model could not load: end the server (``VIT_ON_LOAD_FAILURE=exit``, after the
        runner logged the error) or keep serving the error. Returns whether to keep serving."""
        if settings.on_load_failure == "exit" and server_context.worker_index is not None:
            _logger.error("stopping the server (VIT_ON_LOAD_FAILURE=exit): %s", error)
            # Signals the arbiter: only ever from one of its workers.
            report_failure(f"the model failed to load: {error}")
            return False
        return True

    def stop(error: str) -> None:
        """Nothing can be served: end the server as a failed load does, whatever the policy."""
        if server_context.worker_index is not None:
            report_failure(error)

    workers = max(1, len(plan.devices))

    @bentoml.service(
        name="vit-model",
        workers=workers,
        traffic={"timeout": settings.request_timeout_s},
        logging={"access": {"enabled": False}},
    )
    class VitModel:
        """``split``: one model process per device, holding every model (``VIT_MODELS``) on its
        device, each behind its own socket; serves batches to the HTTP workers over the link.
        Each binds only once its model is warmed up, so an HTTP worker's connection to it is
        the readiness signal; BentoML restarts the process if it dies."""

        def __init__(self) -> None:
            index = _worker_index()
            device = plan.devices[index % len(plan.devices)]
            metrics = create_metrics(settings.max_batch_size, registry)
            runtime = {"pid": os.getpid(), "device": device, "torch_threads": plan.torch_threads}
            self.servers: list[ModelServer] = []
            for number, (name, own) in enumerate(settings.per_model()):
                runner = ModelRunner(
                    own, metrics, device=device, threads=plan.torch_threads, name=name
                )
                # This server's own model processes follow its swap board (a model server run
                # on its own, VIT_MODEL_BIND, has no HTTP workers beside it to share one with).
                files = model_folder(run_folder, number) or folder()
                board = None if settings.model_bind else SwapBoard(files, workers)
                server = ModelServer(
                    runner,
                    settings.model_bind or ipc_endpoint(index, folder=files),
                    runtime,
                    on_load_failure=stop_or_serve,
                    on_bind_failure=stop,
                    swaps=board,
                    index=index,
                )
                self.servers.append(server)
                server.start()

        def __is_ready__(self) -> bool:
            return all(server.runner.ready for server in self.servers) and not draining()

        @bentoml.api
        def status(self) -> dict[str, Any]:
            """This model process: ready, device, queue (for operators and the hop benchmark)."""
            runners = [server.runner for server in self.servers]
            return {
                "ready": all(runner.ready for runner in runners),
                "device": runners[0].device,
                "queued": sum(runner.queued for runner in runners),
            }

        @bentoml.on_shutdown
        async def _shutdown(self) -> None:
            # The HTTP workers drain at the same time and need this process until they are
            # done: wait for them to hang up (at most the grace period). Run on its own, its
            # HTTP workers stay up: they are told to send to the other model servers.
            for server in self.servers:
                if settings.model_bind:
                    server.leave()
                if not await server.idle(DRAIN.grace_left()):
                    _logger.warning("stopping with HTTP workers still connected (grace over)")
                server.stop()

    @bentoml.service(
        name="vit-classifier",
        workers=plan.http_workers,
        traffic={"timeout": settings.request_timeout_s},
        logging={"access": {"enabled": settings.access_log}},
        # OpenTelemetry's middleware wraps every request even with no exporter configured.
        tracing={"excluded_urls": [] if settings.tracing else list(ENDPOINTS)},
    )
    @bentoml.asgi_app(front.app, path="/")
    class VitClassifier:
        """The HTTP service; ``/readyz`` turns 200 once the model (every model process) is
        warm."""

        if plan.topology == "split" and not settings.model_endpoints:
            model_service = bentoml.depends(VitModel)

        def __init__(self) -> None:
            metrics = create_metrics(settings.max_batch_size, registry)
            models = create_backends(
                settings,
                plan,
                metrics,
                index=_worker_index(),
                run_folder=run_folder,
                on_load_failure=stop_or_serve,
            )
            self.worker = HttpWorker(settings, plan, models, metrics)
            front.attach(self.worker)

        @bentoml.on_startup
        async def _start(self) -> None:
            await self.worker.start()
            await front.open_doors()
            # What starting made (the gRPC server, the warm-ups) out of the collector's sight
            # too: a full collection walking it took one first answer's postprocess to 13.6 ms
            # (split, loadtests/first_answer.py).
            settle_heap()

        async def __is_ready__(self) -> bool:
            return await self.worker.is_ready()

        @bentoml.on_shutdown
        async def _shutdown(self) -> None:
            await front.close_doors(0.0)  # already closed, unless the stop skipped the drain
            await self.worker.close()

    return VitModel, VitClassifier


def _worker_index() -> int:
    """0-based index of this worker process within its service."""
    return max(0, (server_context.worker_index or 1) - 1)


SETTINGS = load_settings()
PLAN = plan_for(SETTINGS)
FRONT = Front(SETTINGS)
install(SETTINGS, FRONT)
VitModel, VitClassifier = build(SETTINGS, PLAN, FRONT)
