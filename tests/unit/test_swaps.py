"""A model version swapped in: in one runner (the old version answers what it holds, new
requests go to the new one at once) and across replicas (the run folder's two-phase swap:
all switch, or none does)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import pytest

from service.metrics import create_metrics
from service.model.runner import ModelRunner, Outcome, Work
from service.runtime.settings import Settings
from service.runtime.swaps import Served, Serving, SwapBoard, SwapBusy, SwapFailed
from tests.utils import make_tiny_dir


# --- one runner -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("versions")
    make_tiny_dir(root / "v1", seed=0)
    make_tiny_dir(root / "v2", seed=1)
    return root / "v1", root / "v2"


def _loaded(source: Path) -> ModelRunner:
    """A runner with ``source`` loaded as version 1."""
    metrics = create_metrics(4, prometheus_client.CollectorRegistry())
    settings = Settings(model=f"local-dir:{source}", max_batch_size=4, max_wait_ms=0)
    runner = ModelRunner(settings, metrics, device="cpu", threads=1)
    runner.load()
    return runner


def test_the_old_version_answers_what_it_holds_and_new_requests_go_to_the_new_one(
    versions: tuple[Path, Path],
) -> None:
    v1, v2 = versions
    runner = _loaded(v1)
    release, held = threading.Event(), threading.Event()
    calls: list[int] = []

    def gate(size: int) -> None:  # holds the first batch after the switch starts
        calls.append(size)
        if len(calls) == 1:
            held.set()
            assert release.wait(30)

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    work = Work("cls", image)

    async def scenario() -> tuple[Any, ...]:
        runner.prepare_version(f"local-dir:{v2}", "2")  # beside v1, which still serves
        runner.hold_batches(gate)
        before = asyncio.ensure_future(runner.infer([work]))  # held on v1's model thread
        await asyncio.to_thread(held.wait, 30)
        switching = asyncio.ensure_future(runner.switch())
        await asyncio.sleep(0.05)
        assert not switching.done()  # v1 still holds a request
        after = await runner.infer([work])  # answered by v2 while v1 is held
        release.set()
        drain_s = await switching
        return (await before), after, drain_s

    (old,), (new,), drain_s = asyncio.run(scenario())
    assert isinstance(old, Outcome) and isinstance(new, Outcome)
    assert old.model is not None and new.model is not None
    assert (old.model.version, new.model.version) == ("1", "2")
    assert old.model.source == f"local-dir:{v1}" and new.model.source == f"local-dir:{v2}"
    assert runner.info is new.model
    assert not np.allclose(old.probs, new.probs, atol=1e-3)
    assert drain_s >= 0.04


def test_a_prepared_version_that_is_dropped_never_serves(versions: tuple[Path, Path]) -> None:
    v1, v2 = versions
    runner = _loaded(v1)
    runner.prepare_version(f"local-dir:{v2}", "2")
    runner.drop()
    with pytest.raises(AssertionError, match="no prepared version"):
        asyncio.run(runner.switch())
    assert runner.info.version == "1"


def test_a_canary_takes_its_share_and_a_client_key_keeps_to_one_version(
    versions: tuple[Path, Path],
) -> None:
    v1, v2 = versions
    runner = _loaded(v1)
    runner.prepare_version(f"local-dir:{v2}", "2")
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    async def scenario() -> dict[str, Any]:
        await runner.switch(20)
        assert runner.versions() == {"1", "2"}
        random.seed(0)
        routed = Counter(runner.route().version for _ in range(5000))
        keyed = {
            key: {runner.route(key).version for _ in range(20)} for key in map(str, range(200))
        }
        (answer,) = await runner.infer([Work("cls", image)], version="2")
        (stable,) = await runner.infer([Work("cls", image)], version="1")
        promoted = await runner.traffic(100)
        return {"routed": routed, "keyed": keyed, "answer": answer, "stable": stable,
                "promoted": promoted}  # fmt: skip

    seen = asyncio.run(scenario())
    assert abs(seen["routed"]["2"] / 5000 - 0.20) < 0.02
    assert all(len(found) == 1 for found in seen["keyed"].values())  # sticky
    by_key = Counter(next(iter(found)) for found in seen["keyed"].values())
    assert 20 <= by_key["2"] <= 60  # ~20% of 200 keys
    assert seen["answer"].model.version == "2" and seen["stable"].model.version == "1"
    assert runner.versions() == {"2"} and runner.canary is None
    assert runner.info.version == "2"


# --- across replicas --------------------------------------------------------------------------
V1 = Served(Serving("1", "local-dir:/v1"))


class _Replica:
    """A replica's side of a change (``swaps.Follower``): what it serves, what it was told."""

    def __init__(self, board: SwapBoard, index: int, fail: str | None = None) -> None:
        self.board, self.index, self.fail = board, index, fail
        self.stable, self.canary, self.percent = "1", None, 0
        self.prepared: str | None = None
        self.gate: asyncio.Event | None = None
        self.log: list[str] = []

    def versions(self) -> set[str]:
        return {self.stable} | ({self.canary} if self.canary else set())

    async def prepare(self, source: str, version: str) -> None:
        self.log.append(f"prepare {version}")
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError(self.fail)
        self.prepared = version

    async def switch(self, percent: int) -> float:
        self.log.append(f"switch {percent}")
        assert self.prepared is not None
        if percent >= 100:
            self.stable, self.canary, self.percent = self.prepared, None, 0
        else:
            self.canary, self.percent = self.prepared, percent
        self.prepared = None
        return 0.01

    def drop(self) -> None:
        self.log.append("drop")
        self.prepared = None

    async def traffic(self, percent: int) -> float:
        self.log.append(f"traffic {percent}")
        if percent >= 100:
            self.stable, self.canary, self.percent = str(self.canary), None, 0
        elif percent <= 0:
            self.canary, self.percent = None, 0
        else:
            self.percent = percent
        return 0.0

    async def run(self) -> None:
        while True:
            await self.board.follow(self.index, self)
            await asyncio.sleep(0.005)


def _replicas(folder: Path, count: int, fail: dict[int, str] | None = None) -> list[_Replica]:
    return [_Replica(SwapBoard(folder, count), i, (fail or {}).get(i)) for i in range(count)]


async def _with(replicas: list[_Replica], work: Any) -> Any:
    tasks = [asyncio.ensure_future(r.run()) for r in replicas]
    try:
        return await work
    finally:
        for task in tasks:
            task.cancel()


def test_every_replica_switches_before_the_load_returns(tmp_path: Path) -> None:
    replicas = _replicas(tmp_path, 3)
    board = SwapBoard(tmp_path, 3)
    done = asyncio.run(_with(replicas, board.load("local-dir:/v2", V1, 10)))
    assert done["version"] == "2" and done["source"] == "local-dir:/v2"
    assert done["traffic"] == {"2": 100}
    assert [r["replica"] for r in done["replicas"]] == [0, 1, 2]
    assert [r.stable for r in replicas] == ["2", "2", "2"]
    assert all(r.log == ["prepare 2", "switch 100"] for r in replicas)
    assert board.served() == Served(Serving("2", "local-dir:/v2"), latest=2)  # a restart loads it


def test_one_replica_that_cannot_load_it_keeps_every_replica_on_the_old_version(
    tmp_path: Path,
) -> None:
    replicas = _replicas(tmp_path, 3, fail={1: "out of memory"})
    board = SwapBoard(tmp_path, 3)
    with pytest.raises(SwapFailed, match="replica 1 could not load it: out of memory"):
        asyncio.run(_with(replicas, board.load("local-dir:/v2", V1, 10)))
    assert [r.stable for r in replicas] == ["1", "1", "1"]
    assert all(r.prepared is None and r.log[-1] == "drop" for r in replicas)
    assert board.served() is None
    # The next attempt is a new one: the same version number, every replica asked again.
    for replica in replicas:
        replica.fail = None
    done = asyncio.run(_with(replicas, board.load("local-dir:/v2", V1, 10)))
    assert done["version"] == "2" and [r.stable for r in replicas] == ["2", "2", "2"]


def test_a_replica_that_never_answers_fails_the_load_at_its_deadline(tmp_path: Path) -> None:
    replicas = _replicas(tmp_path, 2)[:1]  # replica 1 is gone
    board = SwapBoard(tmp_path, 2)
    with pytest.raises(SwapFailed, match=r"within 0\.3 s"):
        asyncio.run(_with(replicas, board.load("local-dir:/v2", V1, 0.3)))
    assert replicas[0].stable == "1" and replicas[0].log == ["prepare 2", "drop"]


def test_one_change_at_a_time_whichever_worker_takes_it(tmp_path: Path) -> None:
    replicas = _replicas(tmp_path, 2)
    gate = asyncio.Event()
    for replica in replicas:
        replica.gate = gate

    async def two_loads() -> dict[str, Any]:
        first = asyncio.ensure_future(SwapBoard(tmp_path, 2).load("a@x", V1, 10))
        await asyncio.sleep(0.05)
        with pytest.raises(SwapBusy, match="Another load is under way"):
            await SwapBoard(tmp_path, 2).load("b@y", V1, 10)
        with pytest.raises(SwapBusy):
            await SwapBoard(tmp_path, 2).traffic(50, V1, 10)
        gate.set()
        return await first

    done = asyncio.run(_with(replicas, two_loads()))
    assert done["source"] == "a@x" and [r.stable for r in replicas] == ["2", "2"]


def test_a_canary_takes_its_share_then_is_promoted_or_retired(tmp_path: Path) -> None:
    replicas = _replicas(tmp_path, 2)
    board = SwapBoard(tmp_path, 2)

    async def rollout() -> list[dict[str, Any]]:
        steps = [await board.load("local-dir:/v2", V1, 10, percent=10)]
        assert [(r.stable, r.canary, r.percent) for r in replicas] == [("1", "2", 10)] * 2
        steps.append(await board.traffic(50, V1, 10))
        assert [r.percent for r in replicas] == [50, 50]
        # A second canary replaces the first; the stable version stays.
        steps.append(await board.load("local-dir:/v3", V1, 10, percent=20))
        assert [(r.stable, r.canary, r.percent) for r in replicas] == [("1", "3", 20)] * 2
        steps.append(await board.traffic(100, V1, 10))  # promoted
        assert [(r.stable, r.canary) for r in replicas] == [("3", None)] * 2
        with pytest.raises(SwapFailed, match="no canary"):
            await board.traffic(50, V1, 10)
        steps.append(await board.load("local-dir:/v4", V1, 10, percent=5))
        steps.append(await board.traffic(0, V1, 10))  # retired
        assert [(r.stable, r.canary) for r in replicas] == [("3", None)] * 2
        return steps

    steps = asyncio.run(_with(replicas, rollout()))
    assert [step["traffic"] for step in steps] == [
        {"1": 90, "2": 10}, {"1": 50, "2": 50}, {"1": 80, "3": 20}, {"3": 100},
        {"3": 95, "4": 5}, {"3": 100},
    ]  # fmt: skip
    assert board.served() == Served(Serving("3", "local-dir:/v3"), latest=4)
    # Version numbers are never reused: the next load after the retired 4 is 5.
    done = asyncio.run(_with(replicas, board.load("local-dir:/v5", V1, 10)))
    assert done["version"] == "5"
    # A replica restarted mid-rollout would load what serving.json says: here, version 3 alone.
