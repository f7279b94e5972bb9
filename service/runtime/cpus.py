"""How many CPUs this process may really use: its affinity, capped by a cgroup CPU quota.

``os.cpu_count()`` (and so PyTorch's and Python's default pool sizes) counts the host's cores.
In a container started with ``--cpus 1`` on a 16-core host that means 16 intra-op threads
sharing one CPU's worth of time: the kernel throttles them in turn and every forward pass waits
for the slowest. The quota lives in the cgroup file system, not in any API Python offers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cpus", "cgroup_cpu_limit"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
# Where cgroup v1 mounts the cpu controller, by distribution and runtime.
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus(
    cgroup_root: Path = _CGROUP_ROOT,
    proc_cgroup: Path = _PROC_CGROUP,
    affinity: int | None = None,
) -> int:
    """CPUs to size thread pools by: the CPUs this process may run on (``sched_getaffinity``),
    capped by the cgroup CPU quota rounded down, and at least 1.

    A quota of 1.5 CPUs gives 1 thread: a second thread would only get half a CPU and be
    throttled, which stalls every parallel region it takes part in.
    """
    cpus = affinity if affinity is not None else len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def cgroup_cpu_limit(
    cgroup_root: Path = _CGROUP_ROOT, proc_cgroup: Path = _PROC_CGROUP
) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when it has none.

    Reads cgroup v2 ``cpu.max`` and cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in
    the process's own cgroup and every ancestor up to the mount (the tightest quota wins). A
    container usually sees its own cgroup mounted at the root while ``/proc/self/cgroup`` still
    names the host's path, so the mount's top folder always counts too.
    """
    paths = _cgroup_paths(proc_cgroup)
    mounts = [(cgroup_root, paths.get("", "/"))]
    mounts += [(cgroup_root / name, paths.get("cpu", "/")) for name in _V1_CPU_MOUNTS]
    limits = [
        limit
        for mount, path in mounts
        if mount.is_dir()
        for folder in _folders(mount, path)
        if (limit := _quota(folder)) is not None
    ]
    return min(limits, default=None)


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """``/proc/self/cgroup`` -> {'' (cgroup v2): path, 'cpu' (v1 cpu controller): path}."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":
            paths[""] = path
        elif "cpu" in controllers.split(","):
            paths["cpu"] = path
    return paths


def _folders(mount: Path, path: str) -> list[Path]:
    """The cgroup folder of ``path`` under ``mount`` and its ancestors, or just the mount's top
    folder when the path is not visible there (a container's own namespace)."""
    folder = mount / path.strip("/")
    if not folder.is_dir():
        return [mount]
    return [folder, *[parent for parent in folder.parents if parent.is_relative_to(mount)]]


def _quota(folder: Path) -> float | None:
    """The quota set on one cgroup folder, in CPUs; None if none is set or it is unreadable."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None
