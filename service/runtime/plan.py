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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .cpus import available_cpus
from .settings import Settings

__all__ = ["SMALL_MODEL_BYTES", "Plan", "make_plan", "plan_for", "weight_bytes"]

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
    from ..model.loading import ModelLoadError, parse_source

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
        model_bytes=_all_weight_bytes(settings),
    )


def _all_weight_bytes(settings: Settings) -> int | None:
    """The weights of every model served (``VIT_MODELS``): the memory a copy of them all
    takes, which the plan is made for once (None: one of them has an unknown size)."""
    sizes = [weight_bytes(source) for _, source in settings.model_sources]
    return None if None in sizes else sum(size for size in sizes if size is not None)
