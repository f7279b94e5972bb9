"""Which processes serve, and how many threads each may use: decided once, before BentoML starts.

Two shapes (``VIT_TOPOLOGY``):

- ``replicas``: every HTTP worker process holds a full copy of the model and runs it itself on
  its share of the cores (one thread each when there are as many workers as cores). Nothing
  crosses a process boundary; best when the per-request overhead, not the forward pass,
  dominates (small models on CPU).
- ``split``: HTTP worker processes parse, validate and decode; one model process per device
  (``VIT_DEVICES``) owns the model and forms batches from the requests of all HTTP workers
  (``service/transport.py``). One copy of the model per device, all of a GPU (or the model
  process's cores) on each batch.

``auto`` picks ``split`` whenever a device is a GPU, and on CPU by the model's weight size: under
``SMALL_MODEL_BYTES`` one replica per core serves more requests per second than one model
process fed by HTTP workers (measured by ``make bench``; see docs/ARCHITECTURE.md).

Thread budget: the processes together never ask for more cores than this process may use
(``available_cpus``: affinity capped by a cgroup quota), so adding workers never makes the
processes fight over cores.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .cpus import available_cpus
from .settings import Settings

__all__ = [
    "LOAD_FAILED_EXIT",
    "SMALL_MODEL_BYTES",
    "Plan",
    "ReadyMarks",
    "claim_run_folder",
    "keep_respawning",
    "load_failure_reported",
    "make_plan",
    "plan_for",
    "report_load_failure",
    "run_folder",
    "weight_bytes",
]

Topology = Literal["replicas", "split"]

# Under this many bytes of weights, `auto` on CPU runs one full replica per core.
# The digits model (0.9 MB) serves ~2x more per second as replicas; ViT-S/16 (88 MB) also
# served more as replicas on 2 cores, so the limit sits above it: a split on CPU pays off when
# a replica per core no longer fits comfortably in memory (docs/ARCHITECTURE.md, *Topology*).
SMALL_MODEL_BYTES = 400 * 1024 * 1024
MAX_HTTP_WORKERS = 16


@dataclass(frozen=True)
class Plan:
    """The process layout and per-process thread budget."""

    topology: Topology
    http_workers: int
    devices: tuple[str, ...]  # split: one model process per entry; replicas: each replica's device
    torch_threads: int  # per replica (replicas) or per model process (split)
    decode_threads: int  # per HTTP worker
    reason: str
    cpus: int  # what the budget was made for

    @property
    def model_processes(self) -> int:
        """Model processes beside the HTTP workers (0 for replicas)."""
        return len(self.devices) if self.topology == "split" else 0


def make_plan(
    settings: Settings,
    *,
    cpus: int,
    cuda_devices: int,
    model_bytes: int | None,
) -> Plan:
    """Decide topology, worker count and threads from the settings and what the host has."""
    devices = _devices(settings, cuda_devices)
    on_gpu = any(d.startswith("cuda") for d in devices)
    if settings.model_endpoints or settings.model_bind:
        return _tier_plan(settings, devices, cpus, on_gpu=on_gpu)
    if settings.topology != "auto":
        topology: Topology = settings.topology
        reason = f"VIT_TOPOLOGY={settings.topology}"
    elif on_gpu:
        topology, reason = "split", "a GPU is used: one model process per device"
    elif model_bytes is not None and model_bytes < SMALL_MODEL_BYTES:
        topology = "replicas"
        reason = f"CPU, {model_bytes / 2**20:.0f} MiB of weights: one replica per core"
    else:
        topology = "split"
        size = "unknown size" if model_bytes is None else f"{model_bytes / 2**20:.0f} MiB"
        reason = f"CPU, {size} of weights: one copy, fed by the HTTP workers"

    if topology == "replicas":
        workers = settings.workers or min(cpus, MAX_HTTP_WORKERS)
        share = max(1, cpus // workers)
        threads = settings.torch_threads or share
        # Each replica gets its share of the cores; replicas on one GPU share it.
        replica_devices = tuple(devices[i % len(devices)] for i in range(workers))
        return Plan("replicas", workers, replica_devices, threads, share, reason, cpus)

    processes = len(devices)
    if on_gpu:
        # The model processes mostly wait on the GPU; leave the cores to the HTTP side.
        default_workers = max(1, min(cpus - processes, MAX_HTTP_WORKERS))
        threads = settings.torch_threads or 1
    else:
        # A model too large to copy per core: most cores run it, a quarter parse and decode.
        default_workers = max(1, cpus // 4)
        threads = settings.torch_threads or max(1, (cpus - default_workers) // processes)
    workers = settings.workers or default_workers
    decode = max(1, math.floor(max(1, cpus - processes * threads) / workers))
    busy = workers + (0 if on_gpu else processes * threads)
    if busy > cpus:
        reason += f" (VIT_WORKERS={workers} asks for {busy} busy threads on {cpus} CPUs)"
    return Plan("split", workers, devices, threads, decode, reason, cpus)


def _tier_plan(settings: Settings, devices: tuple[str, ...], cpus: int, *, on_gpu: bool) -> Plan:
    """One tier of a split run as separate servers (separate pods): the HTTP front
    (``VIT_MODEL_ENDPOINTS``) or the model (``VIT_MODEL_BIND``). Nothing else shares this host's
    CPUs, so the front's workers get all of them and the model process all that it can use."""
    if settings.model_endpoints:
        workers = settings.workers or min(cpus, MAX_HTTP_WORKERS)
        decode = max(1, cpus // workers)
        reason = "VIT_MODEL_ENDPOINTS: HTTP workers only, the model processes run elsewhere"
        return Plan("split", workers, devices, settings.torch_threads or 1, decode, reason, cpus)
    if len(devices) > 1:
        raise ValueError(
            f"VIT_MODEL_BIND ({settings.model_bind}) is one socket for one model process, but "
            f"{len(devices)} devices were found ({', '.join(devices)}): run one model server "
            "per device (VIT_DEVICES=cuda:N, or one GPU per pod) and list each in the "
            "front's VIT_MODEL_ENDPOINTS"
        )
    threads = settings.torch_threads or (1 if on_gpu else cpus)
    reason = f"VIT_MODEL_BIND: one model process on {devices[0]}, the HTTP workers run elsewhere"
    return Plan("split", 1, devices, threads, 1, reason, cpus)


def _devices(settings: Settings, cuda_devices: int) -> tuple[str, ...]:
    if settings.devices:
        return tuple(d.strip() for d in settings.devices.split(",") if d.strip())
    device = settings.device
    if device == "auto":
        return tuple(f"cuda:{i}" for i in range(cuda_devices)) or ("cpu",)
    if device == "cuda":
        return ("cuda:0",)
    return (device,)


def weight_bytes(source: str) -> int | None:
    """Size of the checkpoint's weights without loading them, or None when not at hand."""
    from .loading import ModelLoadError, parse_source

    try:
        kind, location, _arch = parse_source(source)
    except ModelLoadError:
        return None
    path: Path | None = None
    if kind == "local-dir":
        path = Path(location).expanduser() / "model.safetensors"
    elif kind == "file":
        path = Path(location).expanduser()
    elif kind == "hf-hub":
        return _cached_hub_bytes(location)
    if path is not None and path.is_file():
        return path.stat().st_size
    return None


def _cached_hub_bytes(model_id: str) -> int | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of timm
        return None
    weights = try_to_load_from_cache(model_id, "model.safetensors")
    if isinstance(weights, str):
        return Path(weights).stat().st_size
    # Only the config is cached: fall back to the parameter count its architecture implies.
    config = try_to_load_from_cache(model_id, "config.json")
    if isinstance(config, str):
        return _meta_bytes(json.loads(Path(config).read_text()).get("architecture"))
    return None


def _meta_bytes(arch: str | None) -> int | None:
    if not arch:
        return None
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    except Exception:
        return None
    return sum(p.numel() * 4 for p in model.parameters())


def plan_for(settings: Settings) -> Plan:
    """The plan for this host (called once at import of the service module)."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return make_plan(
        settings,
        cpus=available_cpus(),
        cuda_devices=cuda,
        model_bytes=weight_bytes(settings.model),
    )


def run_folder(run_id: int | None = None) -> Path:
    """A private folder shared by the processes of one ``bentoml serve``.

    BentoML's arbiter is the parent of every HTTP worker and model process it runs, so its pid
    names the folder and no two servers on a host collide.
    """
    run = os.getppid() if run_id is None else run_id
    folder = Path(tempfile.gettempdir()) / f"vit-serve-{run}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def claim_run_folder() -> Path:
    """In the arbiter (the process whose pid names the folder): start from an empty folder and
    remove it at exit, so no mark or socket of an earlier server whose pid this one reuses can
    count, and nothing is left behind in the temp folder."""
    folder = run_folder(os.getpid())
    for stale in folder.iterdir():
        stale.unlink(missing_ok=True)
    atexit.register(_release_run_folder, folder)
    return folder


def keep_respawning() -> None:
    """In the arbiter: restart a worker that dies, in a container too.

    BentoML turns circus' respawn off inside containers (``BENTOML_CONTAINERIZED``), leaving the
    restart to the orchestrator; but the orchestrator sees only the container, which stays up:
    a dead replica would silently halve capacity and a dead model process would leave every
    request 503 for good. Restarting the process is what it would do anyway, minus the wait.
    """
    import bentoml.serving

    create_watcher = bentoml.serving.create_watcher
    if getattr(create_watcher, "_vit_respawn", False):
        return

    def respawning(*args: Any, **kwargs: Any) -> Any:
        watcher = create_watcher(*args, **kwargs)
        watcher.respawn = True
        return watcher

    respawning._vit_respawn = True  # type: ignore[attr-defined]
    respawning.__wrapped__ = create_watcher  # type: ignore[attr-defined]
    bentoml.serving.create_watcher = respawning


def _release_run_folder(folder: Path) -> None:
    failed = folder / "load-failed"
    error = failed.read_text() if failed.exists() else None
    shutil.rmtree(folder, ignore_errors=True)
    if error is not None:
        print(f"vit-serve: the model failed to load: {error}", file=sys.stderr, flush=True)
        os._exit(LOAD_FAILED_EXIT)


class ReadyMarks:
    """Which replicas of this server are warmed up, so any one of them can answer ``/readyz``
    for all: each writes its pid to ``replica-N.ready`` once warm; a mark whose process is gone
    (a replica that died and is being restarted) does not count."""

    def __init__(self, replicas: int, folder: Path | None = None) -> None:
        self.replicas = replicas
        self.folder = folder

    def _path(self, index: int) -> Path:
        return (self.folder or run_folder()) / f"replica-{index}.ready"

    def mark(self, index: int) -> None:
        """This process (replica ``index``) is warm."""
        self._path(index).write_text(str(os.getpid()))

    def _alive(self, index: int) -> bool:
        try:
            pid = int(self._path(index).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def all_ready(self) -> bool:
        """Every replica has marked itself warm and is still alive."""
        return all(self._alive(index) for index in range(self.replicas))

    def others_ready(self, index: int) -> bool:
        """Some replica other than ``index`` is warm and alive (so ``index`` is a respawn)."""
        return any(self._alive(other) for other in range(self.replicas) if other != index)

    def started(self) -> bool:
        """Every replica was warm at once at least once since the server started; from then on
        each replica answers readiness for itself (a respawning one does not listen)."""
        folder = self.folder or run_folder()
        if (folder / "started").exists():
            return True
        if self.all_ready():
            (folder / "started").touch()
            return True
        return False


LOAD_FAILED_EXIT = 3  # `bentoml serve`'s exit status when the model cannot load


def load_failure_reported() -> bool:
    """Whether a worker of this server reported that the model cannot load."""
    return (run_folder() / "load-failed").exists()


def report_load_failure(error: str) -> None:
    """A worker could not load the model (``VIT_ON_LOAD_FAILURE=exit``): leave the error for
    the arbiter and ask it to stop the server; it then exits with ``LOAD_FAILED_EXIT``."""
    (run_folder() / "load-failed").write_text(error)
    os.kill(os.getppid(), signal.SIGTERM)
