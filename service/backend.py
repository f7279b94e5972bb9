"""The model as an HTTP worker sees it: one ``Backend`` protocol, a local and a remote kind.

- ``LocalBackend`` (``replicas``): the worker's own ``ModelRunner``, plus the replicas' shared
  readiness: ``/readyz`` is 200 once every replica has been warm together, and a replica
  restarted beside warm ones loads before it listens.
- ``RemoteBackend`` (``split``): the worker's ``ModelClient`` to the model processes over the link;
  a fresh worker's first requests and probes wait a moment for its first word from them.

The worker never asks which one it holds; ``create_backend`` picks by the plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import ApiError
from .link.client import ModelClient
from .link.wire import ipc_endpoint
from .metrics import Metrics
from .model.engine import Outcome, Work
from .model.loading import ModelInfo
from .model.runner import ModelRunner, settle_heap
from .runtime.plan import Plan
from .runtime.runfolder import ReadyMarks
from .runtime.settings import Settings

__all__ = [
    "FIRST_CONTACT_S",
    "READY_CONTACT_S",
    "Backend",
    "LocalBackend",
    "RemoteBackend",
    "create_backend",
]

_logger = logging.getLogger(__name__)

# How long a just-started HTTP worker's first requests wait for its first word from a model
# process (the model is usually up: a respawned worker connects within milliseconds).
FIRST_CONTACT_S = 5.0
# The same wait for a worker's first readiness probe, kept within a probe's timeout (2 s).
READY_CONTACT_S = 1.0


class Backend(Protocol):
    """The model as an HTTP worker uses it."""

    warmup_ms: float  # how long the model's warm-up took

    async def start(self) -> None:
        """Begin: load the model or connect to it (on the serving loop, before listening)."""

    async def is_ready(self) -> bool:
        """What ``/readyz`` says of the model (the worker adds its own stop)."""

    @property
    def ready(self) -> bool:
        """The model is warm and can take requests."""

    async def first_contact(self) -> None:
        """Wait (briefly) until the model can be asked at all: before a request."""

    @property
    def info(self) -> ModelInfo:
        """The model's metadata (raises ApiError 503 while there is none)."""

    @property
    def decodes_on_device(self) -> bool:
        """Whether JPEG uploads go to the model undecoded."""

    @property
    def queue_full(self) -> bool:
        """Whether the model's queue is at its bound: admission refuses."""

    def arriving(self, count: int) -> contextlib.AbstractContextManager[None]:
        """Announce ``count`` images being read and decoded, so an idle model waits for them."""

    async def infer(self, works: Sequence[Work]) -> list[Outcome | ApiError]:
        """The model's answer per image (raises ApiError for the whole request)."""

    def runtime(self) -> dict[str, Any]:
        """Facts about where the model runs, for ``GET /model``."""

    async def close(self) -> None:
        """Stop: queued callers are failed."""


class LocalBackend(ModelRunner):
    """``replicas``: the worker's own model, ready for ``/readyz`` once every replica of the
    server has been warm together (``ReadyMarks``); after that each replica answers for
    itself, so a restarted one does not make ``/readyz`` flap.

    Args:
        index: this replica's 0-based index.
        marks: the server's replica marks.
        on_load_failure: called with the error when the model cannot load.
        See ``ModelRunner`` for the rest.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        device: str,
        threads: int,
        index: int,
        marks: ReadyMarks,
        on_load_failure: Callable[[str], object] | None = None,
    ) -> None:
        super().__init__(settings, metrics, device=device, threads=threads)
        self._index = index
        self._marks = marks
        self._on_load_failure = on_load_failure

    async def start(self) -> None:
        """Load in the background. A replica restarted beside warm ones loads before it
        listens (uvicorn listens once the startup hooks return), so it takes no request it
        would answer ``not_ready``. At the server's start no one is warm: all listen at once
        (probes must answer) and ``/readyz`` stays 503 until every replica is warm."""
        index = self._index
        self.start_loading(
            on_ready=lambda: self._marks.mark(index), on_failure=self._on_load_failure
        )
        if not self._marks.others_ready(index):
            return
        _logger.info("a warm replica is serving: loading before listening")
        while not self.settled:
            await asyncio.sleep(0.05)

    async def is_ready(self) -> bool:
        return self.ready and self._marks.started()

    async def first_contact(self) -> None:
        return None

    def runtime(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        await self.aclose()


class RemoteBackend(ModelClient):
    """``split``: the model processes, over the link; ready when every one of this server's own
    model processes is (or, for model servers elsewhere, any one)."""

    async def start(self) -> None:
        self.connect()
        settle_heap()

    async def is_ready(self) -> bool:
        # Just started, this worker's sockets are milliseconds from the model processes: wait
        # for them rather than answer 503 beside a worker that is already ready.
        await self.contact(READY_CONTACT_S)
        return self.ready

    async def first_contact(self) -> None:
        await self.contact(FIRST_CONTACT_S)

    def runtime(self) -> dict[str, Any]:
        return {"model_processes": list(self.processes.values())}

    async def close(self) -> None:
        await self.aclose()


def create_backend(
    settings: Settings,
    plan: Plan,
    metrics: Metrics,
    *,
    index: int,
    run_folder: Path | None = None,
    on_load_failure: Callable[[str], object] | None = None,
) -> Backend:
    """The backend of HTTP worker ``index`` under ``plan``.

    Args:
        run_folder: where the replicas keep their ready marks (default: this server's run
            folder).
        on_load_failure: called with the error when a local model cannot load.
    """
    if plan.topology == "split":
        torch.set_num_threads(1)  # this process never runs the model
        given = [e.strip() for e in settings.model_endpoints.split(",") if e.strip()]
        endpoints = given or [ipc_endpoint(i) for i in range(len(plan.devices))]
        return RemoteBackend(
            endpoints,
            metrics,
            need_all=not given,  # model servers elsewhere: ready while any one of them serves
            queue_bound=settings.max_queue_images,
        )
    return LocalBackend(
        settings,
        metrics,
        device=plan.devices[index % len(plan.devices)],
        threads=plan.torch_threads,
        index=index,
        marks=ReadyMarks(plan.http_workers, run_folder),
        on_load_failure=on_load_failure,
    )
