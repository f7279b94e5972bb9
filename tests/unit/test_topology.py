"""The process layout and thread budget: what `auto` picks, and no oversubscription."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.runtime.plan import SMALL_MODEL_BYTES, Plan, make_plan, weight_bytes
from service.runtime.runfolder import ReadyMarks
from service.runtime.settings import Settings
from tests.conftest import DEFAULT_MODEL_DIR

SMALL = 1_000_000
LARGE = SMALL_MODEL_BYTES * 2


def _plan(cpus: int, cuda: int = 0, model_bytes: int | None = SMALL, **env: Any) -> Plan:
    return make_plan(Settings(**env), cpus=cpus, cuda_devices=cuda, model_bytes=model_bytes)


def test_small_model_on_cpu_runs_one_single_threaded_replica_per_core() -> None:
    plan = _plan(cpus=2)
    assert plan.topology == "replicas"
    assert plan.http_workers == 2 and plan.torch_threads == 1 and plan.decode_threads == 1
    assert plan.model_processes == 0


def test_large_or_unknown_model_on_cpu_is_split() -> None:
    for size in (LARGE, None):
        plan = _plan(cpus=8, model_bytes=size)
        assert plan.topology == "split"
        assert plan.devices == ("cpu",)


def test_gpu_host_splits_one_model_process_per_gpu_and_leaves_the_cores_to_http() -> None:
    plan = _plan(cpus=16, cuda=2)
    assert plan.topology == "split"
    assert plan.devices == ("cuda:0", "cuda:1")
    assert plan.http_workers == 14
    listed = _plan(cpus=16, cuda=2, devices="cuda:1")
    assert listed.devices == ("cuda:1",)


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("cuda", [0, 1, 4])
@pytest.mark.parametrize("size", [SMALL, LARGE])
@pytest.mark.parametrize("topology", ["auto", "replicas", "split"])
def test_processes_together_never_ask_for_more_cores_than_there_are(
    cpus: int, cuda: int, size: int, topology: str
) -> None:
    plan = _plan(cpus=cpus, cuda=cuda, model_bytes=size, topology=topology)
    p = plan
    # A split needs a core on each side of the hop, even on a 1-CPU host.
    if p.topology == "replicas":
        # Each replica runs the model or decodes, one at a time per request.
        asked = p.http_workers * max(p.torch_threads, p.decode_threads)
    else:
        on_gpu = p.devices[0].startswith("cuda")
        model_cores = 0 if on_gpu else p.model_processes * p.torch_threads
        asked = model_cores + p.http_workers * p.decode_threads
    assert asked <= max(cpus, 2 if p.topology == "split" else 1)


def test_more_workers_than_cores_get_one_thread_each() -> None:
    plan = _plan(cpus=2, workers=4)
    assert plan.http_workers == 4 and plan.torch_threads == 1 and plan.decode_threads == 1


def test_weight_bytes_reads_the_checkpoint_size_without_loading() -> None:
    size = (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size
    assert weight_bytes(f"local-dir:{DEFAULT_MODEL_DIR}") == size
    assert weight_bytes(f"vit_tiny_patch16_224@{DEFAULT_MODEL_DIR / 'model.safetensors'}") == size
    assert weight_bytes("local-dir:/nonexistent") is None
    assert weight_bytes("nonsense") is None


def test_replicas_are_ready_only_when_every_one_is_warm_and_alive(tmp_path: Path) -> None:
    marks = ReadyMarks(2, tmp_path)
    assert not marks.all_ready()
    marks.mark(0)
    assert not marks.all_ready()  # replica 1 still loading
    marks.mark(1)
    assert marks.all_ready()
    (tmp_path / "replica-1.ready").write_text(str(_exited_pid()))
    assert not marks.all_ready()  # replica 1 died: being restarted


def test_a_restarted_replica_sees_warm_ones_and_readiness_holds_after_start(
    tmp_path: Path,
) -> None:
    marks = ReadyMarks(2, tmp_path)
    assert not marks.others_ready(1) and not marks.started()  # the server's start: no one warm
    marks.mark(0)
    assert marks.others_ready(1) and not marks.others_ready(0)
    assert not marks.started()  # /readyz waits for every replica at start
    marks.mark(1)
    assert marks.started()
    (tmp_path / "replica-1.ready").write_text(str(_exited_pid()))
    assert marks.others_ready(1)  # so the restarted replica 1 loads before it listens
    assert marks.started()  # and replica 0 stays ready meanwhile: no flapping


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
