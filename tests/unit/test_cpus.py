"""CPU budget from fake cgroup trees: v2 ``cpu.max``, v1 CFS files, ancestors, containers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.runtime.cpus import available_cpus, cgroup_cpu_limit


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("proc_cgroup", "files", "limit"),
    [
        # cgroup v2 inside a container (own cgroup namespace): the quota is at the root.
        ("0::/\n", {"cpu.max": "100000 100000\n"}, 1.0),
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # cgroup v2 on a host: the process's own slice, and the tighter of it and its parent.
        (
            "0::/system.slice/vit.service\n",
            {"system.slice/vit.service/cpu.max": "200000 100000\n", "cpu.max": "max 100000\n"},
            2.0,
        ),
        (
            "0::/system.slice/vit.service\n",
            {
                "system.slice/vit.service/cpu.max": "max 100000\n",
                "system.slice/cpu.max": "50000 100000\n",
            },
            0.5,
        ),
        # cgroup v1 in a container: /proc/self/cgroup names the host path, which is not
        # visible; the container's own cgroup is mounted at the controller's top folder.
        (
            "2:cpuacct:/libpod_parent/libpod-1\n1:cpu:/libpod_parent/libpod-1\n0::/x\n",
            {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"},
            1.0,
        ),
        # cgroup v1 with the combined cpu,cpuacct mount and a visible path.
        (
            "3:cpu,cpuacct:/kubepods/pod1\n",
            {
                "cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us": "250000\n",
                "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us": "100000\n",
                "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
            2.5,
        ),
        # No quota anywhere, or no cgroup file system at all.
        (
            "1:cpu:/\n",
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        ("", {}, None),
        # Garbage is ignored, not fatal.
        ("0::/\n", {"cpu.max": "lots\n"}, None),
    ],
)
def test_cgroup_cpu_limit(
    tmp_path: Path, proc_cgroup: str, files: dict[str, str], limit: float | None
) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    _write(root, files)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_cgroup)
    assert cgroup_cpu_limit(root, proc) == limit


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "expected"),
    [
        ("100000 100000", 16, 1),  # --cpus 1 on a 16-core host
        ("150000 100000", 16, 1),  # a fractional quota rounds down
        ("400000 100000", 16, 4),
        ("400000 100000", 2, 2),  # affinity (taskset, --cpuset-cpus) is tighter
        ("50000 100000", 16, 1),  # never below one thread
        ("max 100000", 8, 8),
    ],
)
def test_available_cpus(tmp_path: Path, cpu_max: str, affinity: int, expected: int) -> None:
    _write(tmp_path, {"cpu.max": cpu_max})
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/\n")
    assert available_cpus(tmp_path, proc, affinity=affinity) == expected


def test_available_cpus_here_is_bounded_by_affinity() -> None:
    """On the real machine: at least 1, never more than the CPUs this process may run on."""
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_missing_proc_file(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path, tmp_path / "absent") is None
