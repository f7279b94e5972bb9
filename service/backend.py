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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import ApiError
from .link.client import ModelClient
from .link.wire import ipc_endpoint
from .metrics import Metrics
from .model.engine import Outcome, Work
from .model.loading import ModelInfo, ModelLoadError, parse_source
from .model.runner import ModelRunner, settle_heap
from .runtime.plan import Plan
from .runtime.runfolder import ReadyMarks, model_folder, run_folder
from .runtime.settings import Settings
from .runtime.swaps import POLL_S as SWAP_POLL_S
from .runtime.swaps import NoCanary, Served, Serving, SwapBoard, SwapBusy, SwapFailed

__all__ = [
    "FIRST_CONTACT_S",
    "READY_CONTACT_S",
    "Backend",
    "LocalBackend",
    "Models",
    "RemoteBackend",
    "create_backends",
    "version_info",
]

_logger = logging.getLogger(__name__)

# How long a just-started HTTP worker's first requests wait for its first word from a model
# process (the model is usually up: a respawned worker connects within milliseconds).
FIRST_CONTACT_S = 5.0
# The same wait for a worker's first readiness probe, kept within a probe's timeout (2 s).
READY_CONTACT_S = 1.0

_ELSEWHERE_CANNOT = ApiError(
    501,
    "not_supported",
    "The model servers run elsewhere (VIT_MODEL_ENDPOINTS): load a version through each model "
    "server's own API, or roll them (a rolling update).",
)


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

    async def infer(
        self, works: Sequence[Work], version: str | None = None
    ) -> list[Outcome | ApiError]:
        """The model's answer per image (raises ApiError for the whole request), from
        ``version`` (``route``'s choice) while it serves."""

    def runtime(self) -> dict[str, Any]:
        """Facts about where the model runs, for ``GET /model``."""

    def route(self, key: str | None = None) -> ModelInfo:
        """The version a request with client ``key`` goes to (``infer`` takes its version)."""

    def versions(self) -> set[str]:
        """The versions serving now (a stable one, and maybe a canary)."""

    @property
    def canary(self) -> tuple[ModelInfo, int] | None:
        """The canary version and its percent of the traffic, if there is one."""

    def repository(self) -> list[dict[str, Any]]:
        """Each version serving: name, version, its percent of the traffic."""

    async def load_version(self, source: str, percent: int = 100) -> dict[str, Any]:
        """Put ``source`` in service as the model's next version in every process that serves
        it, alone or as a canary taking ``percent``; returns once all have switched (raises
        ApiError when it cannot)."""

    async def set_traffic(self, percent: int) -> dict[str, Any]:
        """Give the canary ``percent`` of the traffic everywhere (100 promotes it, 0 retires
        it)."""

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
        name: str = "",
    ) -> None:
        super().__init__(settings, metrics, device=device, threads=threads, name=name)
        self._index = index
        self._marks = marks
        self._swaps = SwapBoard(marks.folder or run_folder(), marks.replicas)
        self._following: Any = None
        self._on_load_failure = on_load_failure

    async def start(self) -> None:
        """Load in the background. A replica restarted beside warm ones loads before it
        listens (uvicorn listens once the startup hooks return), so it takes no request it
        would answer ``not_ready``. At the server's start no one is warm: all listen at once
        (probes must answer) and ``/readyz`` stays 503 until every replica is warm. Once
        loaded, it follows the server's changes (``service/runtime/swaps.py``); a replica
        restarted after one loads what the others serve (a canary once it is ready)."""
        index = self._index
        served = self._swaps.served() or self._configured()

        def ready() -> None:
            self._marks.mark(index)
            self._following = asyncio.run_coroutine_threadsafe(self._follow(), loop)

        loop = asyncio.get_running_loop()
        self.start_loading(
            on_ready=ready,
            on_failure=self._on_load_failure,
            served=served,
        )
        if not self._marks.others_ready(index):
            return
        _logger.info("a warm replica is serving: loading before listening")
        while not self.settled:
            await asyncio.sleep(0.05)

    def _configured(self) -> Served | None:
        """A canary set at start (``VIT_CANARY_MODEL``), beside ``VIT_MODEL``."""
        settings = self.settings
        if not settings.canary_model:
            return None
        stable, canary = Serving("1", settings.model), Serving("2", settings.canary_model)
        return Served(stable, canary, settings.canary_percent, latest=2, name=self.name)

    async def _follow(self) -> None:
        """Act on the server's changes, as long as this replica serves."""
        while True:
            try:
                await self._swaps.follow(self._index, self)
            except Exception:
                _logger.exception("following a model change failed")
            await asyncio.sleep(SWAP_POLL_S)

    async def load_version(self, source: str, percent: int = 100) -> dict[str, Any]:
        if not self.ready:
            raise self._not_ready()
        timeout_s = self.settings.load_timeout_s
        board, served = self._swaps, _served_now(self.info, self.canary)
        return await _change(board.load(_checked(source), served, timeout_s, percent), served)

    async def set_traffic(self, percent: int) -> dict[str, Any]:
        if not self.ready:
            raise self._not_ready()
        timeout_s = self.settings.load_timeout_s
        served = _served_now(self.info, self.canary)
        return await _change(self._swaps.traffic(percent, served, timeout_s), served)

    def repository(self) -> list[dict[str, Any]]:
        info, canary = self.info, self.canary
        if canary is None:
            return [{"name": info.name, "version": info.version, "traffic_percent": 100}]
        return [
            {"name": info.name, "version": info.version, "traffic_percent": 100 - canary[1]},
            {"name": info.name, "version": canary[0].version, "traffic_percent": canary[1]},
        ]

    async def is_ready(self) -> bool:
        return self.ready and self._marks.started()

    async def first_contact(self) -> None:
        return None

    def runtime(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        if self._following is not None:
            self._following.cancel()
        await self.aclose()


class RemoteBackend(ModelClient):
    """``split``: the model processes, over the link; ready when every one of this server's own
    model processes is (or, for model servers elsewhere, any one). A load or a change of
    traffic goes through this server's swap board, which its model processes follow.

    Args:
        load_timeout_s: ``VIT_LOAD_TIMEOUT_S``; run_folder: the server's (default: found).
        See ``ModelClient`` for the rest.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        metrics: Metrics,
        need_all: bool = True,
        *,
        queue_bound: int,
        load_timeout_s: float = 600.0,
        run_folder: Path | None = None,
    ) -> None:
        super().__init__(endpoints, metrics, need_all, queue_bound=queue_bound)
        self.load_timeout_s = load_timeout_s
        self._run_folder = run_folder

    async def start(self) -> None:
        self.connect()
        self.metrics.prepare(stages=("transport",))
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

    def _board(self) -> SwapBoard:
        """This server's swap board, its model processes the replicas that follow it."""
        if not self.need_all:  # model servers elsewhere: no run folder to share with them
            raise _ELSEWHERE_CANNOT
        return SwapBoard(self._run_folder or run_folder(), len(self.endpoints))

    async def load_version(self, source: str, percent: int = 100) -> dict[str, Any]:
        board, served = self._board(), _served_now(self.info, self.canary)
        work = board.load(_checked(source), served, self.load_timeout_s, percent)
        return await _change(work, served)

    async def set_traffic(self, percent: int) -> dict[str, Any]:
        board, served = self._board(), _served_now(self.info, self.canary)
        return await _change(board.traffic(percent, served, self.load_timeout_s), served)

    async def close(self) -> None:
        await self.aclose()


def version_info(backend: Backend, version: str) -> ModelInfo:
    """The info of ``version`` of ``backend``'s model while it serves (the stable version or the
    canary); else 404 ``unknown_version``, naming the versions that serve."""
    info, canary = backend.info, backend.canary
    if info.version == version:
        return info
    if canary is not None and canary[0].version == version:
        return canary[0]
    serving = ", ".join(f"'{v.version}'" for v in (info, *(canary[:1] if canary else ())))
    raise ApiError(
        404,
        "unknown_version",
        f"Model '{info.name}' has no version '{version}' now; it serves version {serving}.",
    )


def _served_now(info: ModelInfo, canary: tuple[ModelInfo, int] | None) -> Served:
    """What serves now, as the swap board writes it."""
    stable = Serving(info.version, info.source)
    if canary is None:
        return Served(stable, name=info.name)
    return Served(stable, Serving(canary[0].version, canary[0].source), canary[1], name=info.name)


def _checked(source: str) -> str:
    """``source``, if it is one a model can be loaded from (400 ``invalid_source`` if not)."""
    try:
        parse_source(source)
    except ModelLoadError as exc:
        raise ApiError(400, "invalid_source", str(exc)) from None
    return source


async def _change(change: Awaitable[dict[str, Any]], served: Served) -> dict[str, Any]:
    """A change on the swap board, its refusals in our shape."""
    try:
        done = await change
    except SwapBusy as exc:
        raise ApiError(409, "load_in_progress", str(exc)) from None
    except NoCanary as exc:
        raise ApiError(409, "no_canary", str(exc)) from None
    except SwapFailed as exc:
        versions = [served.stable.version] + ([served.canary.version] if served.canary else [])
        message = f"{exc} Version {', '.join(versions)} serves on."
        raise ApiError(400, "load_failed", message) from None
    return {"name": served.name, **done}


class Models:
    """The models an HTTP worker serves, by name (``VIT_MODELS``), each its own ``Backend``;
    the first is the default, what a request that names none gets.

    Args:
        backends: ``(name, backend)`` each, the default first; name '' (``VIT_MODEL`` alone):
            the name its checkpoint gives it, known once it is loaded.
    """

    def __init__(self, backends: Sequence[tuple[str, Backend]]) -> None:
        assert backends, "no model"
        self._named = list(backends)
        self.default = backends[0][1]

    def __iter__(self) -> Iterator[Backend]:
        return iter(backend for _, backend in self._named)

    def __len__(self) -> int:
        return len(self._named)

    def _name(self, name: str, backend: Backend) -> str | None:
        """A model's served name, None while a checkpoint-named one is not loaded yet."""
        if name:
            return name
        try:
            return backend.info.name
        except ApiError:
            return None

    def names(self) -> list[str]:
        """The served names known now, the default first."""
        return [n for n in (self._name(name, b) for name, b in self._named) if n is not None]

    def get(self, name: str | None = None) -> Backend:
        """The model ``name`` names (None or '': the default).

        Raises:
            ApiError: 404 ``unknown_model`` (or, for a one-model server whose checkpoint names
                the model, 503 until it is loaded).
        """
        if not name:
            return self.default
        for given, backend in self._named:
            if given == name:
                return backend
        if len(self._named) == 1 and not self._named[0][0]:
            served = self.default.info.name  # 503 ``not_ready`` while it loads
            if served == name:
                return self.default
        known = ", ".join(f"'{n}'" for n in self.names())
        raise ApiError(404, "unknown_model", f"No model '{name}'; this server serves {known}.")

    def queue_full(self, name: str | None = None) -> bool:
        """Whether the named model's queue is at its bound (an unknown name: no, it is refused
        later, in its own words)."""
        try:
            return self.get(name).queue_full
        except ApiError:
            return False

    def listing(self) -> list[dict[str, Any]]:
        """``GET /models``: each model, the default first, with its versions and state."""
        listed: list[dict[str, Any]] = []
        for index, (name, backend) in enumerate(self._named):
            entry: dict[str, Any] = {"name": self._name(name, backend), "default": index == 0}
            try:
                versions = backend.repository()
            except ApiError as exc:  # not loaded (yet, or it failed)
                state = "failed" if exc.code == "load_failed" else "loading"
                entry.update(state=state, versions=[], reason=exc.message)
            else:
                state = "ready" if backend.ready else "loading"
                entry.update(state=state, versions=versions)
                entry["name"] = versions[0]["name"]
            listed.append(entry)
        return listed

    # --- all of them at once ----------------------------------------------------------------
    async def start(self) -> None:
        for backend in self:
            await backend.start()

    async def is_ready(self) -> bool:
        """Every model is ready."""
        for backend in self:
            if not await backend.is_ready():
                return False
        return True

    async def first_contact(self) -> None:
        for backend in self:
            await backend.first_contact()

    async def close(self) -> None:
        for backend in self:
            await backend.close()


def create_backends(
    settings: Settings,
    plan: Plan,
    metrics: Metrics,
    *,
    index: int,
    run_folder: Path | None = None,
    on_load_failure: Callable[[str], object] | None = None,
) -> Models:
    """The models of HTTP worker ``index`` under ``plan``: a backend for each of
    ``Settings.model_sources`` (the canary set at start goes to the first), each keeping its
    files in its own ``model_folder``."""
    backends: list[tuple[str, Backend]] = []
    for number, (name, own) in enumerate(settings.per_model()):
        folder = model_folder(run_folder, number)
        backend = create_backend(
            own,
            plan,
            metrics,
            index=index,
            run_folder=folder,
            on_load_failure=on_load_failure,
            name=name,
        )
        backends.append((name, backend))
    return Models(backends)


def create_backend(
    settings: Settings,
    plan: Plan,
    metrics: Metrics,
    *,
    index: int,
    run_folder: Path | None = None,
    on_load_failure: Callable[[str], object] | None = None,
    name: str = "",
) -> Backend:
    """The backend of HTTP worker ``index`` under ``plan`` for ``settings.model``.

    Args:
        run_folder: where the replicas keep their ready marks, or the model processes their
            sockets (default: this server's run folder).
        on_load_failure: called with the error when a local model cannot load.
        name: the name it is served under ('': its checkpoint's).
    """
    if plan.topology == "split":
        torch.set_num_threads(1)  # this process never runs the model
        given = [e.strip() for e in settings.model_endpoints.split(",") if e.strip()]
        endpoints = given or [ipc_endpoint(i, folder=run_folder) for i in range(len(plan.devices))]
        return RemoteBackend(
            endpoints,
            metrics,
            need_all=not given,  # model servers elsewhere: ready while any one of them serves
            queue_bound=settings.max_queue_images,
            load_timeout_s=settings.load_timeout_s,
            run_folder=run_folder,
        )
    return LocalBackend(
        settings,
        metrics,
        device=plan.devices[index % len(plan.devices)],
        threads=plan.torch_threads,
        index=index,
        marks=ReadyMarks(plan.http_workers, run_folder),
        on_load_failure=on_load_failure,
        name=name,
    )
